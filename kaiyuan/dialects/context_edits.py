"""Anthropic ``context_management`` edits, applied by the gateway to a canonical request.

Anthropic applies these edits on its side before the prompt reaches the model; an upstream that
speaks another protocol has no such field, so when a /v1/messages request is translated the gateway
applies them itself, with the same meaning (Claude Code sends ``clear_thinking_20251015`` whenever
thinking is on). Pure functions over :mod:`kaiyuan.dialects.canonical`; an edit that would change
nothing is dropped. To an Anthropic upstream the field passes through untouched.

- ``clear_thinking_20251015``: ``keep: "all"`` is a no-op; ``keep: {"type": "thinking_turns",
  "value": N}`` (the default, N = 1) removes thinking blocks from all but the last N assistant turns
  that have any.
- ``clear_tool_uses_20250919``: once the trigger is reached (``{"type": "input_tokens", "value"}``,
  default 100,000, an estimate of 4 characters a token here; or ``{"type": "tool_uses", "value"}``),
  the results of all but the last ``keep`` tool uses (default 3) are replaced by a placeholder, and
  with ``clear_tool_inputs`` the calls' arguments too; ``exclude_tools`` are never cleared.
  ``clear_at_least`` is accepted: the gateway clears everything beyond ``keep``, which is at least
  as much.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kaiyuan.dialects import canonical as c
from kaiyuan.errors import GatewayError, invalid

CLEAR_THINKING = "clear_thinking_20251015"
CLEAR_TOOL_USES = "clear_tool_uses_20250919"
EDIT_TYPES = (CLEAR_THINKING, CLEAR_TOOL_USES)
CLEARED = "[tool result cleared to save context]"
DEFAULT_TRIGGER_TOKENS = 100_000
DEFAULT_KEEP_TOOL_USES = 3
CHARS_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class ClearThinking:
    keep_turns: int | None  # None: keep all


@dataclass(frozen=True, slots=True)
class ClearToolUses:
    trigger_kind: str  # "input_tokens" | "tool_uses"
    trigger_value: int
    keep: int
    exclude: frozenset[str]
    clear_inputs: bool


Edit = ClearThinking | ClearToolUses


def _bad(msg: str, where: str) -> GatewayError:
    return invalid(f"{where}: {msg}", param=where)


def _count(obj: Any, kinds: tuple[str, ...], where: str, default: int, allow_zero: bool = True) -> tuple[str, int]:
    if obj is None:
        return kinds[0], default
    if not isinstance(obj, dict) or obj.get("type") not in kinds:
        raise _bad(f"must be an object with type {' or '.join(repr(k) for k in kinds)} and an integer value", where)
    v = obj.get("value")
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
        raise _bad(f"value must be a whole number >= {0 if allow_zero else 1}, got {v!r}", f"{where}.value")
    return str(obj["type"]), v


def parse(cm: Any) -> list[Edit]:
    """The edits of a ``context_management`` value; a 400 naming the field for anything malformed."""
    if cm is None:
        return []
    if not isinstance(cm, dict):
        raise _bad("must be an object with an 'edits' array", "context_management")
    edits = cm.get("edits", [])
    if not isinstance(edits, list):
        raise _bad("must be an array", "context_management.edits")
    out: list[Edit] = []
    for i, e in enumerate(edits):
        where = f"context_management.edits.{i}"
        kind = e.get("type") if isinstance(e, dict) else None
        if kind not in EDIT_TYPES:
            raise _bad(f"unknown edit type {kind!r}; expected one of {', '.join(EDIT_TYPES)}", f"{where}.type")
        assert isinstance(e, dict)
        if kind == CLEAR_THINKING:
            keep = e.get("keep")
            if keep == "all":
                out.append(ClearThinking(None))
            else:
                _k, n = _count(keep, ("thinking_turns",), f"{where}.keep", 1, allow_zero=False)
                out.append(ClearThinking(n))
            continue
        tk, tv = _count(e.get("trigger"), ("input_tokens", "tool_uses"), f"{where}.trigger", DEFAULT_TRIGGER_TOKENS)
        _k, keep_n = _count(e.get("keep"), ("tool_uses",), f"{where}.keep", DEFAULT_KEEP_TOOL_USES)
        _count(e.get("clear_at_least"), ("input_tokens",), f"{where}.clear_at_least", 0)
        excl = e.get("exclude_tools") or []
        if not isinstance(excl, list) or not all(isinstance(x, str) for x in excl):
            raise _bad("must be an array of tool names", f"{where}.exclude_tools")
        ci = e.get("clear_tool_inputs", False)
        if not isinstance(ci, bool):
            raise _bad("must be a boolean", f"{where}.clear_tool_inputs")
        out.append(ClearToolUses(tk, tv, keep_n, frozenset(excl), ci))
    return out


def apply(edits: list[Edit], req: c.Request) -> None:
    """Apply ``edits`` to ``req.messages`` in place, in order."""
    for e in edits:
        if isinstance(e, ClearThinking):
            if e.keep_turns is not None:
                _clear_thinking(req.messages, e.keep_turns)
        else:
            _clear_tool_uses(req, e)


def _clear_thinking(messages: list[c.Message], keep_turns: int) -> None:
    turns = [m for m in messages if m.role == "assistant" and any(isinstance(b, c.Thinking) for b in m.content)]
    for m in turns[:max(0, len(turns) - keep_turns)]:
        m.content = [b for b in m.content if not isinstance(b, c.Thinking)]


def estimate_tokens(req: c.Request) -> int:
    """A cheap size estimate (characters / 4) of the whole prompt, for the input_tokens trigger."""
    chars = sum(len(t.text) for t in req.system)
    for m in req.messages:
        for b in m.content:
            if isinstance(b, (c.Text, c.Thinking)):
                chars += len(b.text)
            elif isinstance(b, c.ToolCall):
                chars += len(b.name) + len(b.arguments)
            elif isinstance(b, c.ToolResult):
                chars += sum(len(p.text) if isinstance(p, c.Text) else 4000 for p in b.content)
            else:
                chars += 4000
    return chars // CHARS_PER_TOKEN


def _clear_tool_uses(req: c.Request, e: ClearToolUses) -> None:
    calls = [b for m in req.messages if m.role == "assistant" for b in m.content if isinstance(b, c.ToolCall)]
    if e.trigger_kind == "tool_uses":
        if len(calls) < e.trigger_value:
            return
    elif estimate_tokens(req) < e.trigger_value:
        return
    clearable = [t for t in calls if t.name not in e.exclude]
    doomed = {t.id for t in clearable[:max(0, len(clearable) - e.keep)]}
    if not doomed:
        return
    for m in req.messages:
        for b in m.content:
            if isinstance(b, c.ToolResult) and b.tool_call_id in doomed:
                b.content = [c.Text(CLEARED)]
            elif e.clear_inputs and isinstance(b, c.ToolCall) and b.id in doomed:
                b.arguments = "{}"
