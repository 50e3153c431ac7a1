"""OpenAI's Responses API (``POST /v1/responses``) -> the canonical request.

Pure functions, no I/O. The server hands in the conversation items (a stored conversation's items
followed by this request's ``input``) and two hooks: ``unseal`` opens an ``encrypted_content``
reasoning blob (the server owns the key). What the caller sent that an upstream cannot run is
reported, never dropped silently:

- hosted tools (``web_search``, ``file_search``, computer use, ...) are listed in
  :attr:`Prepared.omitted_tools` (or refused with a 400, per model);
- ``namespace`` tools are flattened into function tools named ``<namespace>__<name>`` and mapped
  back by :class:`ToolNames`; ``custom`` tools become a function with one string argument.

Output items, the response object and usage are in :mod:`kaiyuan.dialects.responses_out`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from kaiyuan.dialects import canonical as c
from kaiyuan.dialects.openai_chat import EFFORT_BUDGET
from kaiyuan.errors import invalid

FUNCTION_TOOLS = frozenset({"function", "custom", "namespace"})
# Tools the Responses API runs on OpenAI's side; no upstream behind this gateway runs them.
HOSTED_TOOLS = frozenset({
    "web_search", "web_search_preview", "web_search_preview_2025_03_11", "web_search_2025_08_26", "file_search",
    "computer_use_preview", "computer_use", "computer", "code_interpreter", "image_generation", "mcp", "local_shell",
    "shell", "apply_patch", "tool_search",
})
# Accepted and not sent upstream: they change nothing about the answer, or the gateway handles them.
ACCEPTED = frozenset({
    "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text", "reasoning",
    "max_output_tokens", "temperature", "top_p", "metadata", "user", "store", "include", "stream",
    "prompt_cache_key", "prompt_cache_retention", "client_metadata", "previous_response_id", "truncation",
    "service_tier", "safety_identifier", "stream_options", "top_logprobs", "max_tool_calls", "background",
    "conversation", "prompt", "context_management",
})
# Accepted fields whose non-default values cannot be honoured: a 400 naming them.
UNSUPPORTED_VALUES: dict[str, Callable[[Any], bool]] = {
    "background": lambda v: v is True,
    "conversation": lambda v: v is not None,
    "prompt": lambda v: v is not None,
}
INCLUDABLE = frozenset({
    "reasoning.encrypted_content", "message.output_text.logprobs", "file_search_call.results",
    "web_search_call.results", "web_search_call.action.sources", "message.input_image.image_url",
    "computer_call_output.output.image_url", "code_interpreter_call.outputs",
})
NS_SEP = "__"
Unseal = Callable[[str], c.Thinking | None]  # None: a blob not sealed by this gateway


@dataclass(slots=True)
class ToolNames:
    """Flat upstream tool names <-> the caller's (namespace, name, kind)."""

    flat: dict[str, tuple[str | None, str, str]] = field(default_factory=dict)

    def add(self, namespace: str | None, name: str, kind: str) -> str:
        flat = f"{namespace}{NS_SEP}{name}" if namespace else name
        self.flat[flat] = (namespace, name, kind)
        return flat

    def original(self, flat: str) -> tuple[str | None, str, str]:
        return self.flat.get(flat, (None, flat, "function"))

    @staticmethod
    def flatten(namespace: str | None, name: str) -> str:
        return f"{namespace}{NS_SEP}{name}" if namespace else name


@dataclass(slots=True)
class Prepared:
    """A Responses request, ready for any upstream."""

    request: c.Request
    names: ToolNames
    omitted_tools: list[str]  # hosted tool types left out of the upstream call
    summary: bool  # reasoning.summary was asked: reasoning goes out as summary_text
    encrypted: bool  # include: reasoning.encrypted_content
    input_items: list[dict[str, Any]]  # this request's own input, as items (for storage and input_items)


def validate(body: dict[str, Any]) -> None:
    """The shallow checks, after admission: 400s that name the field."""
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise invalid("'model' is required and must be a string", param="model")
    inp = body.get("input")
    if inp is None and not body.get("previous_response_id"):
        raise invalid("'input' is required: a string or a list of input items", param="input")
    if inp is not None and not isinstance(inp, (str, list)):
        raise invalid("'input' must be a string or a list of input items", param="input")
    unknown = sorted(k for k in body if k not in ACCEPTED)
    if unknown:
        raise invalid(f"parameter(s) {', '.join(unknown)} are not part of the Responses API this gateway serves",
                      param=unknown[0], code="unknown_parameter")
    for key, bad in UNSUPPORTED_VALUES.items():
        if key in body and bad(body[key]):
            raise invalid(f"'{key}' is not supported by this gateway; remove it", param=key, code="unsupported_parameter")
    for key, types, what in (("instructions", (str,), "a string"), ("tools", (list,), "a list"),
                             ("metadata", (dict,), "an object"), ("include", (list,), "a list"),
                             ("text", (dict,), "an object"), ("reasoning", (dict,), "an object"),
                             ("previous_response_id", (str,), "a string"), ("user", (str,), "a string"),
                             ("store", (bool,), "a boolean"), ("stream", (bool,), "a boolean"),
                             ("parallel_tool_calls", (bool,), "a boolean")):
        if body.get(key) is not None and not isinstance(body[key], types):
            raise invalid(f"'{key}' must be {what}", param=key)
    for key in ("temperature", "top_p"):
        v = body.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise invalid(f"'{key}' must be a number", param=key)
    if body.get("previous_response_id") == "":
        raise invalid("'previous_response_id' must be a response id (resp_...), not empty; leave it out to start "
                      "a new conversation", param="previous_response_id")
    mot = body.get("max_output_tokens")
    if mot is not None and (isinstance(mot, bool) or not isinstance(mot, int) or mot < 1):
        raise invalid("'max_output_tokens' must be a whole number >= 1", param="max_output_tokens")
    for i, inc in enumerate(body.get("include") or []):
        if inc not in INCLUDABLE:
            raise invalid(f"include[{i}]: {inc!r} is not a known include value", param=f"include[{i}]")


def input_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    """This request's ``input`` as a list of items (a string is one user message)."""
    inp = body.get("input")
    if inp is None:
        return []
    if isinstance(inp, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": inp}]}]
    for i, it in enumerate(inp):
        if not isinstance(it, dict):
            raise invalid(f"input[{i}] must be an object (an input item)", param=f"input[{i}]")
    return list(inp)


def prepare(body: dict[str, Any], history: list[dict[str, Any]], unseal: Unseal,
            refuse_hosted: bool = False) -> Prepared:
    """The canonical request for a validated body; ``history`` is the stored conversation before it."""
    names = ToolNames()
    tools, omitted = _tools(body.get("tools"), names, refuse_hosted)
    own = input_items(body)
    system: list[c.Text] = []
    if isinstance(body.get("instructions"), str) and body["instructions"]:
        system.append(c.Text(body["instructions"]))
    messages = _messages(history + own, len(history), system, unseal)
    reasoning = body.get("reasoning") or {}
    effort = reasoning.get("effort")
    if effort is not None and effort not in EFFORT_BUDGET:
        raise invalid(f"'reasoning.effort' must be one of {', '.join(EFFORT_BUDGET)}", param="reasoning.effort")
    req = c.Request(
        model=body["model"], messages=messages, system=system, max_tokens=body.get("max_output_tokens"),
        temperature=_num(body.get("temperature")), top_p=_num(body.get("top_p")), stream=body.get("stream") is True,
        tools=tools, tool_choice=_tool_choice(body.get("tool_choice"), names),
        parallel_tool_calls=body.get("parallel_tool_calls") if tools else None,
        response_format=_format(body.get("text")),
        thinking_budget=EFFORT_BUDGET[effort] if effort is not None else None,
        user=body.get("user") or body.get("safety_identifier"),
    )
    return Prepared(req, names, omitted, reasoning.get("summary") is not None,
                    "reasoning.encrypted_content" in (body.get("include") or []), own)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# -- tools ------------------------------------------------------------------------------------------
def _function(t: dict[str, Any], where: str, names: ToolNames, namespace: str | None) -> c.Tool:
    name = t.get("name")
    if not isinstance(name, str) or not name:
        raise invalid(f"{where}.name is required", param=f"{where}.name")
    kind = t.get("type")
    if kind == "custom":  # free-form input: one string argument
        desc = t.get("description")
        params: Any = {"type": "object", "properties": {"input": {"type": "string", "description": "the tool's raw input"}},
                       "required": ["input"]}
        return c.Tool(names.add(namespace, name, "custom"), desc if isinstance(desc, str) else None, params)
    params = t.get("parameters")
    desc = t.get("description")
    return c.Tool(names.add(namespace, name, "function"), desc if isinstance(desc, str) else None,
                  params if isinstance(params, dict) else {"type": "object", "properties": {}})


def _tools(tools: Any, names: ToolNames, refuse_hosted: bool) -> tuple[list[c.Tool], list[str]]:
    out: list[c.Tool] = []
    omitted: list[str] = []
    for i, t in enumerate(tools or []):
        where = f"tools[{i}]"
        kind = t.get("type") if isinstance(t, dict) else None
        if not isinstance(kind, str):
            raise invalid(f"{where} must be an object with a 'type'", param=where)
        if kind in ("function", "custom"):
            out.append(_function(t, where, names, None))
        elif kind == "namespace":
            ns = t.get("name")
            if not isinstance(ns, str) or not ns or not isinstance(t.get("tools"), list):
                raise invalid(f"{where}: a namespace tool needs a 'name' and a list of 'tools'", param=where)
            for j, sub in enumerate(t["tools"]):
                if not isinstance(sub, dict) or sub.get("type") not in ("function", "custom"):
                    raise invalid(f"{where}.tools[{j}]: a namespace holds function or custom tools", param=f"{where}.tools[{j}]")
                out.append(_function(sub, f"{where}.tools[{j}]", names, ns))
        elif refuse_hosted:
            raise invalid(f"{where}: the hosted tool {kind!r} cannot run on this model's upstream, and this model "
                          f"refuses hosted tools (hosted_tools: refuse); remove it", param=where, code="unsupported_tool")
        else:
            omitted.append(kind)
    return out, omitted


def _tool_choice(tc: Any, names: ToolNames) -> c.ToolChoice | None:
    if tc is None:
        return None
    if tc in ("auto", "none"):
        return c.ToolChoice(tc)
    if tc == "required":
        return c.ToolChoice("any")
    if isinstance(tc, dict):
        kind = tc.get("type")
        if kind in ("function", "custom") and isinstance(tc.get("name"), str):
            return c.ToolChoice("tool", ToolNames.flatten(tc.get("namespace"), tc["name"]))
        if kind == "allowed_tools":
            return c.ToolChoice("any" if tc.get("mode") == "required" else "auto")
        if isinstance(kind, str):  # a hosted tool: it is not sent, so the model may not be forced to it
            return c.ToolChoice("auto")
    raise invalid("'tool_choice' must be auto, none, required or {type: function, name}", param="tool_choice")


def _format(text: Any) -> dict[str, Any] | None:
    fmt = (text or {}).get("format") if isinstance(text, dict) else None
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict) or not isinstance(fmt.get("name"), str):
            raise invalid("text.format json_schema needs a 'name' and a 'schema' object", param="text.format")
        js = {k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": js}
    raise invalid("'text.format.type' must be text, json_object or json_schema", param="text.format")


# -- input items -> canonical messages --------------------------------------------------------------
def _text_parts(content: Any, where: str, images: bool) -> list[c.Text | c.Image]:
    if isinstance(content, str):
        return [c.Text(content)] if content else []
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or a list of content parts", param=where)
    out: list[c.Text | c.Image] = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        w = f"{where}[{j}]"
        if kind in ("input_text", "output_text", "text") and isinstance(p.get("text"), str):
            out.append(c.Text(p["text"]))
        elif kind == "refusal":
            out.append(c.Text(str(p.get("refusal", ""))))
        elif kind == "input_image" and images:
            out.append(_image(p, w))
        else:
            raise invalid(f"{w}: content part type {kind!r} cannot be translated for this model's upstream "
                          f"(supported: input_text, output_text{', input_image' if images else ''})", param=w)
    return out


def _image(p: dict[str, Any], where: str) -> c.Image:
    url = p.get("image_url")
    if not isinstance(url, str) or not url:
        raise invalid(f"{where}: input_image needs an image_url (file_id is not supported)", param=f"{where}.image_url")
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if ";base64" not in head:
            raise invalid(f"{where}: only base64 data: URLs are supported", param=f"{where}.image_url")
        return c.Image(media_type=head[5:].split(";", 1)[0] or None, data=data)
    return c.Image(url=url)


def _output_text(v: Any, where: str) -> list[c.Text | c.Image]:
    if isinstance(v, str):
        return [c.Text(v)]
    return _text_parts(v, where, True)


class _Builder:
    """Appends canonical blocks, merging consecutive blocks of the same role into one message."""

    def __init__(self) -> None:
        self.messages: list[c.Message] = []

    def add(self, role: c.Role, block: c.Block) -> None:
        if self.messages and self.messages[-1].role == role:
            self.messages[-1].content.append(block)
        else:
            self.messages.append(c.Message(role, [block]))

    def extend(self, role: c.Role, blocks: list[Any]) -> None:
        for b in blocks:
            self.add(role, b)


def _messages(items: list[dict[str, Any]], own_from: int, system: list[c.Text], unseal: Unseal) -> list[c.Message]:
    b = _Builder()
    calls: dict[str, str] = {}
    for i, it in enumerate(items):
        where = f"input[{i - own_from}]" if i >= own_from else f"previous_response input[{i}]"
        kind = it.get("type", "message")
        if kind == "message":
            role = it.get("role")
            if role in ("system", "developer"):
                system.extend(p for p in _text_parts(it.get("content"), f"{where}.content", False) if isinstance(p, c.Text))
            elif role in ("user", "assistant"):
                b.extend(role, _text_parts(it.get("content"), f"{where}.content", role == "user"))
            else:
                raise invalid(f"{where}.role must be user, assistant, system or developer", param=f"{where}.role")
        elif kind in ("function_call", "custom_tool_call"):
            cid, name = it.get("call_id"), it.get("name")
            if not isinstance(cid, str) or not isinstance(name, str):
                raise invalid(f"{where}: a {kind} item needs call_id and name", param=where)
            flat = ToolNames.flatten(it.get("namespace"), name)
            if kind == "custom_tool_call":
                args = orjson.dumps({"input": str(it.get("input", ""))}).decode()
            else:
                raw = it.get("arguments")
                args = raw if isinstance(raw, str) and raw else "{}"
            calls[cid] = flat
            b.add("assistant", c.ToolCall(cid, flat, args))
        elif kind in ("function_call_output", "custom_tool_call_output"):
            cid = it.get("call_id")
            if not isinstance(cid, str) or cid not in calls:
                raise invalid(f"{where}: {kind} answers call_id {cid!r}, but no function_call before it has that id",
                              param=f"{where}.call_id", code="unmatched_tool_result")
            b.add("user", c.ToolResult(cid, _output_text(it.get("output", ""), f"{where}.output"), name=calls[cid]))
        elif kind == "reasoning":
            b.add("assistant", _reasoning(it, where, unseal))
        elif kind == "item_reference":
            raise invalid(f"{where}: item_reference is not supported; send the item itself or use previous_response_id",
                          param=where, code="unsupported_item")
        else:
            raise invalid(f"{where}: input item type {kind!r} cannot be translated for this model's upstream "
                          "(supported: message, function_call, function_call_output, custom_tool_call, "
                          "custom_tool_call_output, reasoning)", param=f"{where}.type")
    if not b.messages:
        raise invalid("the input has no user or assistant content to answer", param="input", code="empty_input")
    return b.messages


def _reasoning(it: dict[str, Any], where: str, unseal: Unseal) -> c.Thinking:
    enc = it.get("encrypted_content")
    if isinstance(enc, str) and enc:
        opened = unseal(enc)
        if opened is not None:
            return opened
    texts = [p.get("text", "") for p in it.get("content") or [] if isinstance(p, dict) and p.get("type") == "reasoning_text"]
    if not texts:
        texts = [p.get("text", "") for p in it.get("summary") or [] if isinstance(p, dict)]
    if not all(isinstance(t, str) for t in texts):
        raise invalid(f"{where}: reasoning text must be strings", param=where)
    return c.Thinking("".join(texts))
