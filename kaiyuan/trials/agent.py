"""Multi-turn agent traces for offline trials: replay a whole conversation, feeding the model the
tool results recorded in the trace, and score the final outcome rather than the first answer.

A dataset item carries ``trace: {"tool_results": [...], "max_turns": 8}``. Each recorded result is
``{"name": TOOL, "arguments": {...} (optional), "content": ...}``. When the model calls a tool, the
first unused recorded result with that name (and those arguments, when the record has them) is
sent back as the ``tool`` message; a call with no recorded result gets an error result saying so,
as a real tool would fail, and the conversation goes on. It ends at an answer without tool calls,
or after ``max_turns`` model calls (marked, and scored as it stands).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from kaiyuan.trials.evaluate import CallOutcome

MAX_TURNS = 50
Chat = Callable[[dict[str, Any]], Awaitable[CallOutcome]]


class TraceError(ValueError):
    """The item's ``trace`` cannot be used; the message says which part."""


@dataclass
class Trace:
    results: list[dict[str, Any]]
    max_turns: int


def parse_trace(obj: Any) -> Trace:
    if not isinstance(obj, dict):
        raise TraceError("'trace' must be a JSON object with 'tool_results' (and optionally 'max_turns')")
    results = obj.get("tool_results", [])
    if not isinstance(results, list) or not all(isinstance(r, dict) and isinstance(r.get("name"), str) and "content" in r
                                                for r in results):
        raise TraceError("'trace.tool_results' must be a list of {\"name\": TOOL, \"content\": ..., \"arguments\": {...}}")
    turns = obj.get("max_turns", 8)
    if not isinstance(turns, int) or isinstance(turns, bool) or not 1 <= turns <= MAX_TURNS:
        raise TraceError(f"'trace.max_turns' must be an integer from 1 to {MAX_TURNS}")
    return Trace(results, turns)


def _args(raw: Any) -> Any:
    if isinstance(raw, dict):
        return raw
    try:
        return orjson.loads(raw or "{}")
    except orjson.JSONDecodeError:
        return raw


def _content(v: Any) -> str:
    return v if isinstance(v, str) else orjson.dumps(v).decode()


def _recorded(trace: Trace, used: set[int], call: dict[str, Any]) -> str:
    """The recorded result for one tool call (each record used once), or an error result."""
    args = _args(call.get("arguments"))
    for i, r in enumerate(trace.results):
        if i in used or r["name"] != call.get("name"):
            continue
        if "arguments" in r and r["arguments"] != args:
            continue
        used.add(i)
        return _content(r["content"])
    return orjson.dumps({"error": f"no recorded result for {call.get('name')}({_content(args)})"}).decode()


async def replay(chat: Chat, request: dict[str, Any], trace: Trace) -> CallOutcome:
    """Run the conversation to its end. The outcome's answer is the final one; its ``steps`` list
    the tool calls made on the way; latency and tokens are the sums over every model call."""
    messages = list(request.get("messages") or [])
    used: set[int] = set()
    steps: list[str] = []
    total = CallOutcome(ms=0.0, prompt_tokens=0, completion_tokens=0)
    for turn in range(1, trace.max_turns + 1):
        out = await chat({**request, "messages": list(messages)})
        total.ms = (total.ms or 0.0) + (out.ms or 0.0)
        total.prompt_tokens = None if out.prompt_tokens is None or total.prompt_tokens is None else total.prompt_tokens + out.prompt_tokens
        total.completion_tokens = (None if out.completion_tokens is None or total.completion_tokens is None
                                   else total.completion_tokens + out.completion_tokens)
        if out.answer is None:
            total.error = f"turn {turn}: {out.error}"
            return total
        ans = out.answer
        if not ans.tool_calls or turn == trace.max_turns:
            if ans.tool_calls:
                steps.append(f"[stopped after {trace.max_turns} turns]")
            ans.steps = steps
            total.answer = ans
            return total
        ids = [f"call_{turn}_{k}" for k in range(len(ans.tool_calls))]
        messages.append({"role": "assistant", "content": ans.text or None, "tool_calls": [
            {"id": i, "type": "function", "function": {"name": c.get("name"), "arguments": c.get("arguments") or "{}"}}
            for i, c in zip(ids, ans.tool_calls, strict=True)]})
        for i, c in zip(ids, ans.tool_calls, strict=True):
            result = _recorded(trace, used, c)
            steps.append(f"{c.get('name')}({c.get('arguments') or ''}) -> {result[:200]}")
            messages.append({"role": "tool", "tool_call_id": i, "content": result})
    raise AssertionError("unreachable: the last turn returns")
