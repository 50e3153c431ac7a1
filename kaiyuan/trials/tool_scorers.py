"""Scorers for structured output, the checks that tell hosts of one open model apart: tool-call
validity against the request's own tool schemas, agreement of tool calls with the incumbent's,
and conformance to the request's ``response_format`` JSON schema.

They read the request from the scored item (``item["request"]``, added by ``evaluate``), in either
wire format: OpenAI ``tools: [{"type": "function", "function": {"name", "parameters"}}]`` and
``response_format: {"type": "json_schema", "json_schema": {"schema"}}``, or Anthropic
``tools: [{"name", "input_schema"}]``. No request tools (or no schema) means the check does not
apply (None), never a free 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from kaiyuan.trials.scorers import Answer

PairScore = dict[str, float | None]


def request_tools(request: Any) -> dict[str, dict[str, Any]]:
    """Tool name -> its JSON schema for the arguments, from an OpenAI or Anthropic request."""
    tools = request.get("tools") if isinstance(request, dict) else None
    out: dict[str, dict[str, Any]] = {}
    for t in tools if isinstance(tools, list) else []:
        if not isinstance(t, dict):
            continue
        fn = t.get("function") if isinstance(t.get("function"), dict) else None
        name = (fn or t).get("name")
        schema = fn.get("parameters") if fn is not None else t.get("input_schema")
        if isinstance(name, str):
            out[name] = schema if isinstance(schema, dict) else {"type": "object"}
    return out


def response_schema(request: Any) -> dict[str, Any] | None:
    """The JSON schema the request asked the answer to follow, if any: OpenAI ``response_format``,
    Anthropic ``output_config.format`` (or the older ``output_format``)."""
    if not isinstance(request, dict):
        return None
    oc = request.get("output_config")
    fmt = (oc.get("format") if isinstance(oc, dict) else None) or request.get("output_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return fmt.get("schema") if isinstance(fmt.get("schema"), dict) else None
    rf = request.get("response_format")
    if not isinstance(rf, dict):
        return None
    if rf.get("type") == "json_schema":
        js = rf.get("json_schema")
        sch = js.get("schema") if isinstance(js, dict) else None
        return sch if isinstance(sch, dict) else None
    if rf.get("type") == "json_object":
        return {"type": "object"}
    return None


def _args(call: dict[str, Any]) -> Any:
    """A tool call's arguments as JSON; raises ValueError when they are not JSON."""
    raw = call.get("arguments")
    if isinstance(raw, dict):
        return raw
    try:
        return orjson.loads(raw or "{}")
    except orjson.JSONDecodeError as e:
        raise ValueError(str(e)) from None


def valid(doc: Any, schema: dict[str, Any]) -> bool:
    import jsonschema

    try:
        jsonschema.validate(doc, schema)
    except jsonschema.ValidationError:
        return False
    return True


def tool_call_valid(answer: Answer, item: dict[str, Any]) -> float | None:
    """Share of the answer's tool calls that name a tool the request offered and whose arguments
    are JSON valid against that tool's schema. None when the request has no tools or the answer
    calls none."""
    tools = request_tools(item.get("request"))
    if not tools or not answer.tool_calls:
        return None
    ok = 0
    for call in answer.tool_calls:
        schema = tools.get(str(call.get("name")))
        if schema is None:
            continue
        try:
            ok += valid(_args(call), schema)
        except ValueError:
            continue
    return ok / len(answer.tool_calls)


def json_conforms(answer: Answer, item: dict[str, Any], schema: dict[str, Any] | None = None) -> float | None:
    """1 when the answer text is a JSON document valid against the schema (the scorer's, else the
    item's ``schema``, else the request's ``response_format``); None when there is no schema."""
    sch = schema or item.get("schema") or response_schema(item.get("request"))
    if not isinstance(sch, dict):
        return None
    try:
        doc = orjson.loads(answer.text)
    except orjson.JSONDecodeError:
        return 0.0
    return float(valid(doc, sch))


def _same_call(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.get("name") != b.get("name"):
        return False
    try:
        return bool(_args(a) == _args(b))
    except ValueError:
        return False


class ToolAgreement:
    """Agreement of the candidate's tool calls with the incumbent's on the same request: calls
    compared in order, name and arguments (as parsed JSON, so key order and spacing do not
    matter); the candidate scores the share of positions that match, out of the longer list.
    The incumbent is the reference and scores 1. None when neither answer calls a tool."""

    pairwise = True

    def __call__(self, answer: Answer, item: dict[str, Any]) -> float | None:
        return None  # needs the incumbent's answer: see pair()

    def pair(self, inc: Answer | None, cand: Answer | None, item: dict[str, Any]) -> PairScore:
        a = inc.tool_calls if inc is not None else []
        b = cand.tool_calls if cand is not None else []
        if inc is None or (not a and not b):
            return {"incumbent": None, "candidate": None}
        matched = sum(_same_call(x, y) for x, y in zip(a, b, strict=False))
        return {"incumbent": 1.0, "candidate": matched / max(len(a), len(b))}


def build(kind: str, schema: dict[str, Any] | None) -> Callable[[Answer, dict[str, Any]], float | None]:
    if kind == "tool_schema":
        return tool_call_valid
    if kind == "tool_agreement":
        return ToolAgreement()
    return lambda a, i: json_conforms(a, i, schema)
