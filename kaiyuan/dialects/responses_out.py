"""The canonical response -> OpenAI Responses API output: the response object, its output items and
its usage. Pure functions, shared by whole replies and the stream translator
(:mod:`kaiyuan.dialects.responses_stream`), so both give the same items.

Reasoning (DeepSeek ``reasoning_content``, Anthropic thinking, Gemini thoughts) becomes a
``reasoning`` item: its text as ``content`` (``reasoning_text``), and also as ``summary``
(``summary_text``) when the caller asked for ``reasoning.summary``; with
``include: ["reasoning.encrypted_content"]`` it carries a sealed blob (text and upstream signature)
that the caller hands back in the next turn. The seal is a hook: the key belongs to the server.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from kaiyuan.dialects import canonical as c
from kaiyuan.dialects.responses import ToolNames

Seal = Callable[[c.Thinking], str]
# Request fields echoed in the response object, with their defaults.
ECHOED: dict[str, Any] = {
    "instructions": None, "max_output_tokens": None, "parallel_tool_calls": True, "previous_response_id": None,
    "temperature": None, "top_p": None, "tool_choice": "auto", "tools": [], "user": None, "metadata": {},
    "store": True, "truncation": "disabled", "prompt_cache_key": None, "service_tier": "default",
    "max_tool_calls": None, "safety_identifier": None, "top_logprobs": 0,
}


def new_id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(16).hex()}"


@dataclass(slots=True)
class Shape:
    """How one response's items are written: tool names, reasoning form, the seal."""

    names: ToolNames = field(default_factory=ToolNames)
    summary: bool = False
    seal: Seal | None = None  # set when include has reasoning.encrypted_content


def usage(u: c.Usage) -> dict[str, Any]:
    return {"input_tokens": u.input_tokens,
            "input_tokens_details": {"cached_tokens": u.cache_read or 0, "cache_write_tokens": u.cache_write or 0},
            "output_tokens": u.output_tokens, "output_tokens_details": {"reasoning_tokens": u.reasoning or 0},
            "total_tokens": u.input_tokens + u.output_tokens}


def usage_to_canonical(u: Any) -> c.Usage:
    """A Responses usage object (a pass-through upstream's) -> canonical."""
    if not isinstance(u, dict):
        return c.Usage()
    itd, otd = u.get("input_tokens_details") or {}, u.get("output_tokens_details") or {}
    return c.Usage(int(u.get("input_tokens") or 0), int(u.get("output_tokens") or 0), itd.get("cached_tokens"), None,
                   otd.get("reasoning_tokens"))


def reasoning_item(item_id: str, b: c.Thinking, shape: Shape) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "reasoning", "id": item_id,
                            "summary": [{"type": "summary_text", "text": b.text}] if shape.summary and b.text else []}
    if b.text:
        item["content"] = [{"type": "reasoning_text", "text": b.text}]
    if shape.seal is not None:
        item["encrypted_content"] = shape.seal(b)
    return item


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def call_item(item_id: str, call: c.ToolCall, shape: Shape, status: str = "completed") -> dict[str, Any]:
    ns, name, kind = shape.names.original(call.name)
    if kind == "custom":
        return {"type": "custom_tool_call", "id": item_id, "call_id": call.id, "name": name,
                "input": _custom_input(call.arguments), "status": status, **({"namespace": ns} if ns else {})}
    item = {"type": "function_call", "id": item_id, "call_id": call.id, "name": name, "arguments": call.arguments,
            "status": status}
    if ns:
        item["namespace"] = ns
    return item


def _custom_input(arguments: str) -> str:
    try:
        v = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        return arguments
    return str(v.get("input", "")) if isinstance(v, dict) else arguments


def output_items(blocks: list[c.Block], shape: Shape) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    text: list[str] = []

    def flush() -> None:
        if text:
            out.append(message_item(new_id("msg"), "".join(text)))
            text.clear()

    for b in blocks:
        if isinstance(b, c.Text):
            text.append(b.text)
        elif isinstance(b, c.ToolCall):
            flush()
            out.append(call_item(new_id("fc"), b, shape))
        elif isinstance(b, c.Thinking):
            flush()
            out.append(reasoning_item(new_id("rs"), b, shape))
    flush()
    return out


def status_of(stop_reason: str) -> tuple[str, dict[str, Any] | None]:
    """(status, incomplete_details) for a canonical stop reason."""
    if stop_reason == "max_tokens":
        return "incomplete", {"reason": "max_output_tokens"}
    if stop_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def skeleton(resp_id: str, model: str, body: dict[str, Any], created_at: int | None = None) -> dict[str, Any]:
    """The response object before any output (``response.created``): status in_progress."""
    r: dict[str, Any] = {"id": resp_id, "object": "response", "created_at": created_at or int(time.time()),
                         "status": "in_progress", "background": False, "error": None, "incomplete_details": None,
                         "model": model, "output": [], "usage": None}
    for key, default in ECHOED.items():
        v = body.get(key)
        r[key] = v if v is not None else default
    reasoning: dict[str, Any] = body["reasoning"] if isinstance(body.get("reasoning"), dict) else {}
    r["reasoning"] = {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")}
    text: dict[str, Any] = body["text"] if isinstance(body.get("text"), dict) else {}
    r["text"] = {"format": text.get("format") or {"type": "text"}, "verbosity": text.get("verbosity") or "medium"}
    return r


def finished(r: dict[str, Any], output: list[dict[str, Any]], stop_reason: str, u: c.Usage) -> dict[str, Any]:
    status, details = status_of(stop_reason)
    return {**r, "status": status, "incomplete_details": details, "output": output, "usage": usage(u),
            "completed_at": int(time.time()) if status == "completed" else None}


def output_text(output: list[dict[str, Any]]) -> str:
    return "".join(p.get("text", "") for it in output if it.get("type") == "message"
                   for p in it.get("content") or [] if p.get("type") == "output_text")
