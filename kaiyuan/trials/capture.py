"""Reading a captured live answer and request in either caller dialect (OpenAI or Anthropic).

The gateway captures the bytes it sent the client (``ctx.response_body``) for sampled requests:
an OpenAI chat completion or SSE stream, or an Anthropic message or SSE stream. Trials compare
answers as :class:`Answer` (text + tool calls) whatever the dialect.
"""

from __future__ import annotations

from typing import Any

import orjson

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


def answer_of(dialect: str, data: bytes | None) -> Answer:
    """The captured answer the client got, in the caller's ``dialect``."""
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
