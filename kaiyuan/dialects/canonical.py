"""The canonical conversation: what every dialect is translated to and from.

Small slotted dataclasses, no validation (each dialect's parser validates its own input and raises
a 400 that names the field). Tool arguments are kept as the JSON *text* the model produced, so a
translation never re-serialises (and never reorders or drops) them. Vendor differences live in the
tables at the bottom, not in branches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# "system" is a system message *inside* the conversation (Anthropic's mid-conversation system
# messages); the leading system prompt stays in Request.system. Each outbound dialect maps it onto
# its nearest form (see docs/translation.md).
Role = Literal["user", "assistant", "system"]
# Request.thinking_budget: None not asked, 0 disabled, > 0 a budget in tokens, THINKING_ADAPTIVE the
# model decides (Anthropic ``{"type": "adaptive"}``, Gemini ``thinkingBudget: -1``).
THINKING_ADAPTIVE = -1
# A mid-conversation system message folded into a user turn, for an upstream with no place for it.
SYSTEM_MARK = "<system>\n{}\n</system>"


@dataclass(slots=True)
class Text:
    text: str


@dataclass(slots=True)
class Image:
    media_type: str | None = None
    data: str | None = None  # base64, without the data: prefix
    url: str | None = None


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, verbatim


@dataclass(slots=True)
class ToolResult:
    tool_call_id: str
    content: list[Text | Image]
    is_error: bool = False
    name: str | None = None  # Gemini needs the function name; filled from the matching call


@dataclass(slots=True)
class Thinking:
    text: str
    signature: str | None = None
    redacted: str | None = None  # Anthropic redacted_thinking data


Block = Text | Image | ToolCall | ToolResult | Thinking


@dataclass(slots=True)
class Message:
    role: Role
    content: list[Block]


@dataclass(slots=True)
class Tool:
    name: str
    description: str | None
    parameters: dict[str, Any]


@dataclass(slots=True)
class ToolChoice:
    mode: Literal["auto", "any", "none", "tool"]
    name: str | None = None


@dataclass(slots=True)
class Request:
    model: str
    messages: list[Message]
    system: list[Text] = field(default_factory=list)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    tools: list[Tool] = field(default_factory=list)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None  # OpenAI shape: {"type": "json_object"|"json_schema", ...}
    thinking_budget: int | None = None  # None: not asked; 0: disabled; THINKING_ADAPTIVE: the model decides
    user: str | None = None
    include_usage: bool = False  # OpenAI stream_options.include_usage
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0  # all prompt tokens, cached included (OpenAI's prompt_tokens)
    output_tokens: int = 0  # reasoning included
    cache_read: int | None = None
    cache_write: int | None = None
    reasoning: int | None = None


@dataclass(slots=True)
class Response:
    id: str
    model: str
    content: list[Block]
    stop_reason: str  # canonical: see STOP_REASONS
    usage: Usage
    stop_sequence: str | None = None


# -- stop / finish reasons, as data --------------------------------------------------------------
STOP_REASONS = ("end", "max_tokens", "tool_use", "stop_sequence", "content_filter", "pause")

OPENAI_FINISH_TO_CANON = {
    "stop": "end",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "content_filter",
}
CANON_TO_OPENAI_FINISH = {
    "end": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "stop_sequence": "stop",
    "content_filter": "content_filter",
    "pause": "stop",
}
ANTHROPIC_STOP_TO_CANON = {
    "end_turn": "end",
    "max_tokens": "max_tokens",
    "tool_use": "tool_use",
    "stop_sequence": "stop_sequence",
    "refusal": "content_filter",
    "pause_turn": "pause",
    "model_context_window_exceeded": "max_tokens",
}
CANON_TO_ANTHROPIC_STOP = {
    "end": "end_turn",
    "max_tokens": "max_tokens",
    "tool_use": "tool_use",
    "stop_sequence": "stop_sequence",
    "content_filter": "refusal",
    "pause": "pause_turn",
}
GEMINI_FINISH_TO_CANON = {
    "STOP": "end",
    "MAX_TOKENS": "max_tokens",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "LANGUAGE": "end",
    "OTHER": "end",
    "MALFORMED_FUNCTION_CALL": "end",
    "FINISH_REASON_UNSPECIFIED": "end",
}


def final_stop(reason: str | None, has_tool_calls: bool) -> str:
    """The canonical stop reason, corrected for upstreams that say "stop" after calling a tool
    (Gemini always does; some OpenAI-compatible servers do): a reply with tool calls that ended
    normally ended *because of* the tool calls."""
    r = reason or "end"
    if has_tool_calls and r == "end":
        return "tool_use"
    return r


def tool_calls_of(blocks: list[Block]) -> list[ToolCall]:
    return [b for b in blocks if isinstance(b, ToolCall)]


def joined_text(blocks: list[Any]) -> str:
    return "".join(b.text for b in blocks if isinstance(b, Text))
