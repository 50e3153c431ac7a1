"""Reading a captured live answer and request in the caller's dialect (OpenAI chat, Anthropic
Messages, or the Responses API, which trials call dialect "responses").

The gateway captures the bytes it sent the client (``ctx.response_body``) for sampled requests:
an OpenAI chat completion or SSE stream, an Anthropic message or SSE stream, or a Responses object
or event stream. Trials compare answers as :class:`Answer` (text + tool calls) whatever the dialect.
A /v1/responses request is replayed from its canonical form (``ctx.mirror_request``: the history
``previous_response_id`` brought in included), and shown to the judge and the report as chat.
"""

from __future__ import annotations

from typing import Any

import orjson

from kaiyuan.context import RequestContext
from kaiyuan.dialects import canonical as cn
from kaiyuan.dialects import openai_chat as oc
from kaiyuan.trials.policy import request_policy
from kaiyuan.trials.scorers import Answer, answer_from_bytes


def answer_from_anthropic_json(obj: Any) -> Answer:
    """An Anthropic Messages response: text blocks joined, tool_use blocks as tool calls."""
    if not isinstance(obj, dict):
        return Answer()
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for b in obj.get("content") or []:
        if not isinstance(b, dict):
            continue
        if b.get("type") == "text":
            text.append(str(b.get("text") or ""))
        elif b.get("type") == "tool_use":
            calls.append({"name": b.get("name"), "arguments": orjson.dumps(b.get("input") or {}).decode()})
    return Answer("".join(text), calls)


def answer_from_anthropic_sse(data: bytes) -> Answer:
    """Reassemble an Anthropic Messages stream (text deltas, tool_use blocks and their JSON deltas)."""
    text: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    for line in data.replace(b"\r\n", b"\n").split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        try:
            ev = orjson.loads(line[5:].strip())
        except orjson.JSONDecodeError:
            continue
        if not isinstance(ev, dict):
            continue
        kind = ev.get("type")
        if kind == "content_block_start":
            block = ev.get("content_block") or {}
            if block.get("type") == "tool_use":
                calls[int(ev.get("index", 0))] = {"name": block.get("name"), "arguments": ""}
            elif block.get("type") == "text" and block.get("text"):
                text.append(str(block["text"]))
        elif kind == "content_block_delta":
            d = ev.get("delta") or {}
            if d.get("type") == "text_delta":
                text.append(str(d.get("text") or ""))
            elif d.get("type") == "input_json_delta" and int(ev.get("index", 0)) in calls:
                calls[int(ev.get("index", 0))]["arguments"] += str(d.get("partial_json") or "")
        elif kind == "message_stop":
            break
    for c in calls.values():
        c["arguments"] = c["arguments"] or "{}"
    return Answer("".join(text), [calls[i] for i in sorted(calls)])


def answer_from_responses_json(obj: Any) -> Answer:
    """A Responses object: output_text parts joined, function calls (``namespace__name`` when the
    call came from a namespace tool, as the upstream saw it) as tool calls."""
    if not isinstance(obj, dict):
        return Answer()
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for item in obj.get("output") or []:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            text.extend(str(p.get("text") or "") for p in item.get("content") or []
                        if isinstance(p, dict) and p.get("type") == "output_text")
        elif item.get("type") in ("function_call", "custom_tool_call"):
            name = str(item.get("name"))
            ns = item.get("namespace")
            args = item.get("arguments") if item.get("type") == "function_call" else \
                orjson.dumps({"input": item.get("input") or ""}).decode()
            calls.append({"name": f"{ns}__{name}" if ns else name, "arguments": args or "{}"})
    return Answer("".join(text), calls)


def answer_from_responses_sse(data: bytes) -> Answer:
    """A Responses event stream: the response its last ``response.*`` event carries, else (a capture
    cut short) the text deltas and the finished call items."""
    text: list[str] = []
    items: list[Any] = []
    for line in data.replace(b"\r\n", b"\n").split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        try:
            ev = orjson.loads(line[5:].strip())
        except orjson.JSONDecodeError:
            continue
        kind = ev.get("type") if isinstance(ev, dict) else None
        if kind in ("response.completed", "response.incomplete"):
            return answer_from_responses_json(ev.get("response"))
        if kind == "response.output_text.delta":
            text.append(str(ev.get("delta") or ""))
        elif kind == "response.output_item.done" and isinstance(ev.get("item"), dict) and ev["item"].get("type") != "message":
            items.append(ev["item"])
    return Answer("".join(text), answer_from_responses_json({"output": items}).tool_calls)


def answer_of(dialect: str, data: bytes | None) -> Answer:
    """The captured answer the client got, in the caller's ``dialect``."""
    if dialect == "responses":
        if not data:
            return Answer()
        if data.lstrip()[:6].startswith((b"event:", b"data:")):
            return answer_from_responses_sse(data)
        try:
            return answer_from_responses_json(orjson.loads(data))
        except orjson.JSONDecodeError:
            return Answer()
    if dialect != "anthropic":
        return answer_from_bytes(data)
    if not data:
        return Answer()
    head = data.lstrip()[:6]
    if head.startswith(b"event:") or head.startswith(b"data:"):
        return answer_from_anthropic_sse(data)
    try:
        return answer_from_anthropic_json(orjson.loads(data))
    except orjson.JSONDecodeError:
        return Answer()


def judge_request(dialect: str, body: dict[str, Any]) -> dict[str, Any]:
    """The request as the judge and the report see it: chat messages, with an Anthropic ``system``
    prompt as the first (system) message."""
    if dialect != "anthropic" or not body.get("system"):
        return body
    sys = body["system"]
    if isinstance(sys, list):
        sys = " ".join(str(b.get("text", "")) for b in sys if isinstance(b, dict))
    return {**body, "messages": [{"role": "system", "content": str(sys)}, *(body.get("messages") or [])]}


def snapshot(ctx: RequestContext, forwarded: tuple[str, ...]) -> dict[str, Any] | None:
    """What a background trial call needs from a finished request (nothing that refers to ctx): a
    /v1/responses request as its canonical form (replayed) and as chat (for the judge and report);
    None for one that has none (a pass-through continuing the upstream's own state)."""
    canonical = ctx.mirror_request
    if ctx.endpoint == "responses":
        if not isinstance(canonical, cn.Request):
            return None
        dialect, body = "responses", oc.request_from_canonical(canonical, ctx.model or "")
    else:
        dialect, body, canonical = ctx.dialect, ctx.body, None
    return {
        "request_id": ctx.request_id,
        "dialect": dialect,
        "canonical": canonical,
        "body": {k: v for k, v in body.items() if k not in ("stream", "stream_options")},
        "response": ctx.response_body,
        "ms": ctx.elapsed() * 1000,
        "cost": ctx.cost_usd,
        "usage": (ctx.usage.prompt_tokens, ctx.usage.completion_tokens),
        "policy": request_policy(ctx),
        "headers": {h: ctx.headers[h] for h in forwarded if ctx.headers and h in ctx.headers},
    }
