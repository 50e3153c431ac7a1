"""OpenAI's wire format: request checks, usage extraction, and the error shape.

The checks are deliberately shallow and fast: they reject what would make the gateway or the
upstream misbehave (wrong types, missing fields) with a message that names the field, and let
everything else through untouched, so new upstream parameters keep working.
"""

from __future__ import annotations

from typing import Any

import orjson

from kaiyuan.accounting.usage_check import reported_tokens
from kaiyuan.context import Usage
from kaiyuan.errors import GatewayError, invalid

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_NUMBER = (int, float)


def error_body(err: GatewayError) -> bytes:
    """``{"error": {"message", "type", "param", "code"}}``."""
    return orjson.dumps(
        {
            "error": {
                "message": err.message,
                "type": err.upstream_type or err.kind.value.openai_type,
                "param": err.param,
                "code": err.code if err.code is not None else err.kind.name.lower(),
            }
        }
    )


def stream_error_event(err: GatewayError) -> bytes:
    """An SSE event that the OpenAI SDKs raise as an APIError, so a broken stream is never silent."""
    return b"data: " + error_body(err) + b"\n\n"


def _type_name(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number" if isinstance(v, _NUMBER) else type(v).__name__
    )


def _expect(body: dict[str, Any], key: str, types: tuple[type, ...], what: str) -> Any:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
        raise invalid(f"'{key}' must be {what}, got {_type_name(v)}", param=key, code="invalid_type")
    return v


def require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise invalid("'model' is required: name one of the models listed at GET /v1/models", param="model", code="missing_model")
    if not isinstance(model, str) or not model:
        raise invalid(f"'model' must be a non-empty string, got {_type_name(model)}", param="model", code="invalid_type")
    return model


def _check_common(body: dict[str, Any]) -> None:
    _expect(body, "stream", (bool,), "a boolean")
    for key in ("max_tokens", "max_completion_tokens", "n", "seed", "top_logprobs"):
        v = _expect(body, key, (int,), "an integer")
        if v is not None and key in ("max_tokens", "max_completion_tokens", "n") and v < 1:
            raise invalid(f"'{key}' must be at least 1, got {v}", param=key, code="invalid_value")
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        _expect(body, key, _NUMBER, "a number")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str):
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise invalid("'stop' must be a string or an array of strings", param="stop", code="invalid_type")
    so = _expect(body, "stream_options", (dict,), "an object")
    if so is not None and "include_usage" in so and not isinstance(so["include_usage"], bool):
        raise invalid("'stream_options.include_usage' must be a boolean", param="stream_options.include_usage")


def validate_chat(body: dict[str, Any]) -> None:
    require_model(body)
    messages = body.get("messages")
    if messages is None:
        raise invalid("'messages' is required: an array of {role, content} objects", param="messages", code="missing_messages")
    if not isinstance(messages, list):
        raise invalid(f"'messages' must be an array, got {_type_name(messages)}", param="messages", code="invalid_type")
    if not messages:
        raise invalid("'messages' must contain at least one message", param="messages", code="empty_messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}] must be an object, got {_type_name(m)}", param=f"messages[{i}]", code="invalid_type")
        role = m.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise invalid(
                f"messages[{i}].role must be one of {', '.join(sorted(CHAT_ROLES))}, got {role!r}",
                param=f"messages[{i}].role",
                code="invalid_value",
            )
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise invalid(
                f"messages[{i}].content must be a string or an array of content parts, got {_type_name(content)}",
                param=f"messages[{i}].content",
                code="invalid_type",
            )
    _check_common(body)
    tools = _expect(body, "tools", (list,), "an array")
    if tools is not None:
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or not isinstance(t.get("function", t.get("custom")), dict):
                raise invalid(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}", param=f"tools[{i}]")
    rf = _expect(body, "response_format", (dict,), "an object")
    if rf is not None:
        kind = rf.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise invalid("'response_format.type' must be text, json_object or json_schema", param="response_format.type")
        if kind == "json_schema" and not isinstance(rf.get("json_schema"), dict):
            raise invalid("'response_format.json_schema' is required when type is json_schema", param="response_format.json_schema")


def validate_completions(body: dict[str, Any]) -> None:
    require_model(body)
    prompt = body.get("prompt")
    if prompt is None:
        raise invalid("'prompt' is required", param="prompt", code="missing_prompt")
    if not isinstance(prompt, (str, list)):
        raise invalid(f"'prompt' must be a string or an array, got {_type_name(prompt)}", param="prompt", code="invalid_type")
    _check_common(body)


def validate_embeddings(body: dict[str, Any]) -> None:
    require_model(body)
    inp = body.get("input")
    if inp is None:
        raise invalid("'input' is required: a string or an array of strings", param="input", code="missing_input")
    if not isinstance(inp, (str, list)) or (isinstance(inp, list) and not inp):
        raise invalid("'input' must be a non-empty string or array", param="input", code="invalid_type")
    _expect(body, "dimensions", (int,), "an integer")
    _expect(body, "encoding_format", (str,), "a string")


def token_count(v: Any) -> int | None:
    """A reported token count, validated and clamped (kaiyuan.accounting.usage_check); None: unknown."""
    return reported_tokens(v)


def usage_into(usage: Any, out: Usage) -> None:
    """Copy an OpenAI-style ``usage`` object into ``out``; keeps cached and reasoning tokens
    (``prompt_tokens_details.cached_tokens``, or DeepSeek's ``prompt_cache_hit_tokens``)."""
    if not isinstance(usage, dict):
        return
    out.prompt_tokens = token_count(usage.get("prompt_tokens"))
    out.completion_tokens = token_count(usage.get("completion_tokens"))
    details = usage.get("prompt_tokens_details")
    cached = token_count(details.get("cached_tokens")) if isinstance(details, dict) else None
    if cached is None:
        cached = token_count(usage.get("prompt_cache_hit_tokens"))
    if cached is None:
        cached = token_count(usage.get("cached_tokens"))  # Moonshot/Kimi
    out.cached_tokens = cached
    cdetails = usage.get("completion_tokens_details")
    if isinstance(cdetails, dict):
        out.reasoning_tokens = token_count(cdetails.get("reasoning_tokens"))
