"""Anthropic Messages API <-> canonical, request checks, and the Anthropic error shape. Pure functions.

``validate`` is the structural check every /v1/messages request gets (also on the pass-through to
an Anthropic upstream); ``request_to_canonical`` runs only when the upstream speaks another
protocol, and refuses (400) block types no other protocol can carry.
"""

from __future__ import annotations

import os
from typing import Any

import orjson

from kaiyuan.accounting.usage_check import reported_tokens
from kaiyuan.dialects import canonical as c
from kaiyuan.dialects import context_edits
from kaiyuan.errors import ErrorKind, GatewayError, anthropic_type, invalid

ROLES = ("user", "assistant", "system")  # "system": a mid-conversation system message (not first)
# Every block type the Messages API defines; anything else is a client bug (400).
KNOWN_BLOCKS = frozenset({
    "text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking", "server_tool_use",
    "web_search_tool_result", "web_fetch_tool_result", "code_execution_tool_result", "search_result",
    "container_upload", "mcp_tool_use", "mcp_tool_result",
})
TRANSLATABLE_BLOCKS = frozenset({"text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking"})
ANTHROPIC_TYPES = frozenset({
    "invalid_request_error", "authentication_error", "billing_error", "permission_error", "not_found_error",
    "request_too_large", "rate_limit_error", "api_error", "overloaded_error", "timeout_error",
})
KNOWN_PARAMS = frozenset({
    "model", "messages", "max_tokens", "system", "stop_sequences", "stream", "temperature", "top_p", "top_k",
    "tools", "tool_choice", "metadata", "thinking", "service_tier", "container", "mcp_servers", "context_management",
    "cache_control", "output_config", "output_format", "inference_geo", "speed", "diagnostics", "user_profile_id",
    "workspace_id",
})
UNTRANSLATABLE_PARAMS = ("container", "mcp_servers")
THINKING_TYPES = ("enabled", "disabled", "adaptive")


def error_type(err: GatewayError) -> str:
    """The type follows the status (one table, :func:`kaiyuan.errors.anthropic_type`); an upstream's
    own Anthropic type is kept only for a status the table does not name."""
    return anthropic_type(err, err.upstream_type if err.upstream_type in ANTHROPIC_TYPES else None)


def error_body(err: GatewayError) -> bytes:
    """``{"type": "error", "error": {"type", "message"}}``."""
    return orjson.dumps({"type": "error", "error": {"type": error_type(err), "message": err.message}})


def sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def stream_error_event(err: GatewayError) -> bytes:
    return b"event: error\ndata: " + error_body(err) + b"\n\n"


def new_message_id() -> str:
    return "msg_" + os.urandom(12).hex()


# -- validation -----------------------------------------------------------------------------------
def _bad(msg: str, param: str | None = None) -> GatewayError:
    return invalid(msg, param=param)


def validate(body: dict[str, Any]) -> None:
    """Shallow checks with Anthropic-style messages (``messages.1.content.0: ...``)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model: Field required (a non-empty string)", "model")
    mt = body.get("max_tokens")
    if mt is None:
        raise _bad("max_tokens: Field required", "max_tokens")
    if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
        raise _bad(f"max_tokens: must be an integer >= 1, got {mt!r}", "max_tokens")
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        raise _bad("messages: Field required (an array of {role, content})", "messages")
    if not msgs:
        raise _bad("messages: at least one message is required", "messages")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise _bad("stream: must be a boolean", "stream")
    sys = body.get("system")
    if sys is not None and not isinstance(sys, (str, list)):
        raise _bad("system: must be a string or an array of text blocks", "system")
    if isinstance(sys, list):
        for j, b in enumerate(sys):
            if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
                raise _bad(f"system.{j}: system blocks must be text blocks", f"system.{j}")
    ss = body.get("stop_sequences")
    if ss is not None and (not isinstance(ss, list) or not all(isinstance(s, str) for s in ss)):
        raise _bad("stop_sequences: must be an array of strings", "stop_sequences")
    for key in ("temperature", "top_p"):
        v = body.get(key)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise _bad(f"{key}: must be a number", key)
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _bad("tools: must be an array", "tools")
    for i, t in enumerate(tools or []):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise _bad(f"tools.{i}.name: Field required", f"tools.{i}")
    prev_calls: set[str] = set()
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages.{i}: must be an object with role and content", f"messages.{i}")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"messages.{i}.role: must be 'user', 'assistant' or 'system', got {role!r}", f"messages.{i}.role")
        if i == 0 and role != "user":
            hint = " (put the leading system prompt in the top-level 'system' parameter)" if role == "system" else ""
            raise _bad(f"messages.0.role: the first message must use the 'user' role{hint}", "messages.0.role")
        content = m.get("content")
        if role == "system":
            _validate_system_message(content, i)
            prev_calls = set()
            continue
        if isinstance(content, str):
            prev_calls = set()
            continue
        if not isinstance(content, list):
            raise _bad(f"messages.{i}.content: must be a string or an array of content blocks", f"messages.{i}.content")
        calls: set[str] = set()
        for j, b in enumerate(content):
            where = f"messages.{i}.content.{j}"
            kind = b.get("type") if isinstance(b, dict) else None
            if not isinstance(kind, str) or kind not in KNOWN_BLOCKS:
                raise _bad(f"{where}.type: unknown content block type {kind!r}; expected one of "
                           "text, image, document, tool_use, tool_result, thinking, redacted_thinking", f"{where}.type")
            assert isinstance(b, dict)
            if kind == "text" and not isinstance(b.get("text"), str):
                raise _bad(f"{where}.text: Field required", where)
            if kind == "thinking" and not isinstance(b.get("thinking"), str):
                raise _bad(f"{where}.thinking: Field required (a string)", where)
            if kind == "tool_use":
                if role != "assistant":
                    raise _bad(f"{where}: tool_use blocks may only appear in assistant messages", where)
                if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str):
                    raise _bad(f"{where}: tool_use blocks need an id and a name", where)
                calls.add(b["id"])
            if kind == "tool_result":
                if role != "user":
                    raise _bad(f"{where}: tool_result blocks may only appear in user messages", where)
                tid = b.get("tool_use_id")
                if not isinstance(tid, str) or tid not in prev_calls:
                    raise _bad(f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: {tid}. Each "
                               "`tool_result` block must have a corresponding `tool_use` block in the previous message.", where)
        prev_calls = calls if role == "assistant" else set()


def _validate_system_message(content: Any, i: int) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list) or not all(
            isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str) for b in content):
        raise _bad(f"messages.{i}.content: a system message holds a string or text blocks only", f"messages.{i}.content")


def system_text(content: Any) -> str:
    """The text of a (validated) system message's content."""
    return content if isinstance(content, str) else "".join(b["text"] for b in content)


def fold_system_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mid-conversation system messages as user-turn text blocks marked as system (for an upstream
    that does not take ``role: system`` in ``messages``; the API merges consecutive user turns)."""
    return [{"role": "user", "content": [{"type": "text", "text": c.SYSTEM_MARK.format(system_text(m["content"]))}]}
            if m.get("role") == "system" else m for m in messages]


def thinking_budget(thinking: Any) -> int | None:
    """``thinking`` -> canonical budget: enabled N -> N, adaptive -> THINKING_ADAPTIVE, disabled -> 0."""
    if thinking is None:
        return None
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind not in THINKING_TYPES:
        raise invalid("thinking.type: must be 'enabled', 'disabled' or 'adaptive'", param="thinking.type")
    assert isinstance(thinking, dict)
    if kind == "adaptive":
        return c.THINKING_ADAPTIVE
    if kind == "disabled":
        return 0
    budget = thinking.get("budget_tokens", 1024)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise invalid(f"thinking.budget_tokens: must be a whole number >= 1, got {budget!r}", param="thinking.budget_tokens")
    return budget


# -- Anthropic request -> canonical ---------------------------------------------------------------
def _image(b: dict[str, Any], where: str) -> c.Image:
    src = b.get("source") or {}
    if src.get("type") == "base64" and isinstance(src.get("data"), str):
        return c.Image(media_type=src.get("media_type"), data=src["data"])
    if src.get("type") == "url" and isinstance(src.get("url"), str):
        return c.Image(url=src["url"])
    raise invalid(f"{where}.source: image sources must be base64 or url", param=f"{where}.source")


def _result_content(b: dict[str, Any], where: str) -> list[c.Text | c.Image]:
    content = b.get("content")
    if content is None:
        return []
    if isinstance(content, str):
        return [c.Text(content)]
    out: list[c.Text | c.Image] = []
    for k, p in enumerate(content if isinstance(content, list) else []):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text":
            out.append(c.Text(str(p.get("text", ""))))
        elif kind == "image":
            out.append(_image(p, f"{where}.content.{k}"))
        else:
            raise invalid(f"{where}.content.{k}: block type {kind!r} inside tool_result cannot be translated for "
                          "this model's upstream", param=f"{where}.content.{k}")
    return out


def _blocks(content: Any, i: int, calls: dict[str, str]) -> list[c.Block]:
    if isinstance(content, str):
        return [c.Text(content)] if content else []
    out: list[c.Block] = []
    for j, b in enumerate(content):
        where = f"messages.{i}.content.{j}"
        kind = b["type"]
        if kind not in TRANSLATABLE_BLOCKS:
            raise invalid(f"{where}: {kind} blocks cannot be translated for this model's upstream (it is not an "
                          "Anthropic deployment)", param=where)
        if kind == "text":
            out.append(c.Text(b["text"]))
        elif kind == "image":
            out.append(_image(b, where))
        elif kind == "tool_use":
            inp = b.get("input")
            out.append(c.ToolCall(b["id"], b["name"], orjson.dumps(inp if inp is not None else {}).decode()))
        elif kind == "tool_result":
            tid = b["tool_use_id"]
            out.append(c.ToolResult(tid, _result_content(b, where), bool(b.get("is_error")), calls.get(tid)))
        elif kind == "thinking":
            out.append(c.Thinking(str(b.get("thinking", "")), b.get("signature")))
        else:
            out.append(c.Thinking("", redacted=str(b.get("data", ""))))
    return out


def request_to_canonical(body: dict[str, Any]) -> c.Request:
    """A validated Messages body -> canonical (400 for what other protocols cannot carry)."""
    for key in UNTRANSLATABLE_PARAMS:
        if body.get(key):
            raise invalid(f"{key}: has no equivalent in this model's upstream API; remove it", param=key)
    unknown = sorted(k for k in body if k not in KNOWN_PARAMS)
    if unknown:
        raise invalid(f"{', '.join(unknown)}: Extra inputs are not permitted", param=unknown[0])
    sys = body.get("system")
    system = [c.Text(sys)] if isinstance(sys, str) and sys else [c.Text(b["text"]) for b in sys or []]
    messages: list[c.Message] = []
    calls: dict[str, str] = {}
    for i, m in enumerate(body["messages"]):
        if m["role"] == "system":
            messages.append(c.Message("system", [c.Text(system_text(m["content"]))]))
            continue
        blocks = _blocks(m["content"], i, calls)
        calls = {b.id: b.name for b in blocks if isinstance(b, c.ToolCall)}
        messages.append(c.Message(m["role"], blocks))
    tools = []
    for i, t in enumerate(body.get("tools") or []):
        if t.get("type") not in (None, "custom"):
            raise invalid(f"tools.{i}: server tool {t.get('type')!r} cannot be translated for this model's upstream",
                          param=f"tools.{i}")
        tools.append(c.Tool(t["name"], t.get("description"), t.get("input_schema") or {"type": "object", "properties": {}}))
    tc = body.get("tool_choice")
    choice = None
    parallel = None
    if isinstance(tc, dict):
        mode = tc.get("type")
        if mode not in ("auto", "any", "tool", "none"):
            raise invalid("tool_choice.type: must be auto, any, tool or none", param="tool_choice.type")
        choice = c.ToolChoice(mode, tc.get("name") if mode == "tool" else None)
        if tc.get("disable_parallel_tool_use") is True:
            parallel = False
    budget = thinking_budget(body.get("thinking"))
    edits = context_edits.parse(body.get("context_management"))
    meta = body.get("metadata")
    fmt = (body.get("output_config") or {}).get("format") or body.get("output_format")
    response_format = None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        response_format = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt.get("schema") or {}}}
    req = c.Request(
        model=body["model"], messages=messages, system=system, max_tokens=body["max_tokens"],
        temperature=body.get("temperature"), top_p=body.get("top_p"), top_k=body.get("top_k"),
        stop=list(body.get("stop_sequences") or []), stream=body.get("stream") is True, tools=tools,
        tool_choice=choice, parallel_tool_calls=parallel, thinking_budget=budget, response_format=response_format,
        user=meta.get("user_id") if isinstance(meta, dict) else None,
    )
    context_edits.apply(edits, req)
    return req


# -- canonical -> Anthropic request (OpenAI callers to Anthropic upstreams) -----------------------
def _image_out(b: c.Image) -> dict[str, Any]:
    if b.url:
        return {"type": "image", "source": {"type": "url", "url": b.url}}
    return {"type": "image", "source": {"type": "base64", "media_type": b.media_type or "image/png", "data": b.data}}


def _block_out(b: c.Block) -> dict[str, Any] | None:
    if isinstance(b, c.Text):
        return {"type": "text", "text": b.text} if b.text else None
    if isinstance(b, c.Image):
        return _image_out(b)
    if isinstance(b, c.ToolCall):
        try:
            inp = orjson.loads(b.arguments or "{}")
        except orjson.JSONDecodeError:
            raise invalid(f"tool call {b.id}: arguments are not valid JSON; Anthropic needs a JSON object") from None
        return {"type": "tool_use", "id": b.id, "name": b.name, "input": inp}
    if isinstance(b, c.ToolResult):
        content: Any = [_block_out(p) for p in b.content]
        if all(isinstance(p, c.Text) for p in b.content):
            content = c.joined_text(b.content)
        out: dict[str, Any] = {"type": "tool_result", "tool_use_id": b.tool_call_id, "content": content}
        if b.is_error:
            out["is_error"] = True
        return out
    if b.redacted is not None:
        return {"type": "redacted_thinking", "data": b.redacted}
    if not b.signature:
        return None  # Anthropic refuses thinking it did not sign; unsigned reasoning is not sent back
    return {"type": "thinking", "thinking": b.text, "signature": b.signature}


def request_from_canonical(req: c.Request, model: str, default_max_tokens: int) -> dict[str, Any]:
    for key in ("seed", "presence_penalty", "frequency_penalty"):
        if getattr(req, key) not in (None, 0, 0.0):
            raise invalid(f"'{key}' has no equivalent in the Anthropic Messages API; remove it", param=key,
                          code="unsupported_parameter")
    msgs: list[dict[str, Any]] = []
    for m in req.messages:
        role = m.role
        if role == "system":  # folded into a user turn (see fold_system_messages)
            role, blocks = "user", [{"type": "text", "text": c.SYSTEM_MARK.format(c.joined_text(m.content))}]
        else:
            blocks = [o for o in (_block_out(b) for b in m.content) if o is not None]
        if role == "user":  # tool results first, as Anthropic requires
            blocks.sort(key=lambda o: o["type"] != "tool_result")
        if msgs and msgs[-1]["role"] == role:
            msgs[-1]["content"].extend(blocks)
        else:
            msgs.append({"role": role, "content": blocks})
    budget = req.thinking_budget
    max_tokens = req.max_tokens or default_max_tokens + max(budget or 0, 0)  # must exceed the budget
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "messages": msgs}
    system = c.joined_text(req.system)
    rf = req.response_format
    schema = (rf.get("json_schema") or {}).get("schema") if rf and rf.get("type") == "json_schema" else None
    if schema is not None:  # structured outputs
        body["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
    elif rf and rf.get("type") == "json_object":  # no JSON mode without a schema: ask for it
        hint = "Respond with a single JSON object and nothing else."
        system = (system + "\n\n" + hint) if system else hint
    if system:
        body["system"] = system
    for key in ("temperature", "top_p", "top_k"):
        v = getattr(req, key)
        if v is not None:
            body[key] = v
    if req.stop:
        body["stop_sequences"] = req.stop
    if req.user:
        body["metadata"] = {"user_id": req.user}
    if req.tools:
        body["tools"] = [{"name": t.name, **({"description": t.description} if t.description else {}),
                          "input_schema": t.parameters} for t in req.tools]
    tc = req.tool_choice
    if tc is not None or req.parallel_tool_calls is False:
        choice: dict[str, Any] = {"type": tc.mode if tc else "auto"}
        if tc is not None and tc.mode == "tool":
            choice["name"] = tc.name
        if req.parallel_tool_calls is False and choice["type"] != "none":
            choice["disable_parallel_tool_use"] = True
        if req.tools or choice["type"] == "none":
            body["tool_choice"] = choice
    if budget is not None:
        body["thinking"] = ({"type": "adaptive"} if budget == c.THINKING_ADAPTIVE
                            else {"type": "enabled", "budget_tokens": budget} if budget else {"type": "disabled"})
    if req.stream:
        body["stream"] = True
    return body


# -- responses ------------------------------------------------------------------------------------
def usage_to_canonical(u: Any) -> c.Usage:
    if not isinstance(u, dict):
        return c.Usage()
    read = reported_tokens(u.get("cache_read_input_tokens"), "cache_read_input_tokens")
    write = reported_tokens(u.get("cache_creation_input_tokens"), "cache_creation_input_tokens")
    total_in = (reported_tokens(u.get("input_tokens"), "input_tokens") or 0) + (read or 0) + (write or 0)
    return c.Usage(total_in, reported_tokens(u.get("output_tokens"), "output_tokens") or 0, read, write)


def usage_from_canonical(u: c.Usage) -> dict[str, Any]:
    read, write = u.cache_read or 0, u.cache_write or 0
    return {"input_tokens": max(0, u.input_tokens - read - write), "cache_creation_input_tokens": write,
            "cache_read_input_tokens": read, "output_tokens": u.output_tokens}


def response_to_canonical(obj: dict[str, Any]) -> c.Response:
    blocks: list[c.Block] = []
    for b in obj.get("content") or []:
        kind = b.get("type")
        if kind == "text":
            blocks.append(c.Text(b.get("text", "")))
        elif kind == "tool_use":
            blocks.append(c.ToolCall(b["id"], b["name"], orjson.dumps(b.get("input") or {}).decode()))
        elif kind == "thinking":
            blocks.append(c.Thinking(b.get("thinking", ""), b.get("signature")))
        elif kind == "redacted_thinking":
            blocks.append(c.Thinking("", redacted=b.get("data", "")))
    reason = c.ANTHROPIC_STOP_TO_CANON.get(obj.get("stop_reason") or "end_turn", "end")
    return c.Response(str(obj.get("id") or ""), str(obj.get("model") or ""), blocks,
                      c.final_stop(reason, bool(c.tool_calls_of(blocks))), usage_to_canonical(obj.get("usage")),
                      obj.get("stop_sequence"))


def response_from_canonical(r: c.Response, model: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    for b in r.content:
        if isinstance(b, c.Thinking):
            content.append({"type": "redacted_thinking", "data": b.redacted} if b.redacted is not None
                           else {"type": "thinking", "thinking": b.text, "signature": b.signature or ""})
        elif isinstance(b, c.ToolCall):
            try:
                inp = orjson.loads(b.arguments or "{}")
            except orjson.JSONDecodeError:
                raise GatewayError(ErrorKind.UPSTREAM_ERROR,
                                   f"the upstream returned tool call {b.id} with arguments that are not JSON") from None
            content.append({"type": "tool_use", "id": b.id, "name": b.name, "input": inp})
        elif isinstance(b, c.Text):
            content.append({"type": "text", "text": b.text})
    rid = r.id if r.id.startswith("msg_") else new_message_id()
    return {"id": rid, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": c.CANON_TO_ANTHROPIC_STOP.get(r.stop_reason, "end_turn"), "stop_sequence": r.stop_sequence,
            "usage": usage_from_canonical(r.usage)}
