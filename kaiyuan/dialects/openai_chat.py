"""OpenAI Chat Completions <-> canonical (requests and whole responses). Pure functions, no I/O.

Used only when the caller's dialect and the upstream's protocol differ; same-dialect traffic never
comes here. Parameters with no canonical equivalent are refused with a 400 naming them
(:data:`UNTRANSLATABLE`), never dropped silently. See docs/translation.md.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from kaiyuan.accounting.usage_check import reported_tokens
from kaiyuan.dialects import canonical as c
from kaiyuan.errors import invalid

# Parameters whose non-default values cannot be carried to a non-OpenAI upstream.
UNTRANSLATABLE: dict[str, Any] = {
    "n": lambda v: v not in (None, 1),
    "logprobs": lambda v: bool(v),
    "top_logprobs": lambda v: v is not None,
    "logit_bias": lambda v: bool(v),
    "audio": lambda v: v is not None,
    "modalities": lambda v: v not in (None, ["text"]),
    "prediction": lambda v: v is not None,
    "web_search_options": lambda v: v is not None,
    "functions": lambda v: v is not None,
    "function_call": lambda v: v is not None,
}
# Accepted and deliberately not forwarded (documented): bookkeeping for OpenAI's own platform.
IGNORED = frozenset({"store", "metadata", "service_tier", "stream_options", "verbosity"})
# reasoning_effort -> a thinking budget in tokens (Anthropic thinking.budget_tokens, Gemini thinkingBudget).
EFFORT_BUDGET = {"none": 0, "minimal": 1024, "low": 1024, "medium": 4096, "high": 16384, "xhigh": 32768}
KNOWN = frozenset(
    {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop", "stream",
     "tools", "tool_choice", "parallel_tool_calls", "response_format", "user", "seed", "presence_penalty",
     "frequency_penalty", "reasoning_effort"}
) | IGNORED | frozenset(UNTRANSLATABLE)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _image(part: dict[str, Any], where: str) -> c.Image:
    iu = part.get("image_url")
    url = iu.get("url") if isinstance(iu, dict) else iu
    if not isinstance(url, str) or not url:
        raise invalid(f"{where}.image_url.url must be a non-empty string", param=f"{where}.image_url")
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        media = head[5:].split(";", 1)[0] or None
        if ";base64" not in head:
            raise invalid(f"{where}: only base64 data: URLs are supported", param=f"{where}.image_url")
        return c.Image(media_type=media, data=data)
    return c.Image(url=url)


def _parts(content: Any, where: str, allow_images: bool = True) -> list[c.Text | c.Image]:
    if content is None:
        return []
    if isinstance(content, str):
        return [c.Text(content)] if content else []
    out: list[c.Text | c.Image] = []
    for j, p in enumerate(content):
        w = f"{where}[{j}]"
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text" and isinstance(p.get("text"), str):
            out.append(c.Text(p["text"]))
        elif kind == "image_url" and allow_images:
            out.append(_image(p, w))
        elif kind == "refusal":
            out.append(c.Text(str(p.get("refusal", ""))))
        else:
            raise invalid(f"{w}: content part type {kind!r} cannot be translated for this model's upstream "
                          f"(supported: text{', image_url' if allow_images else ''})", param=w)
    return out


def request_to_canonical(body: dict[str, Any]) -> c.Request:
    """An already shallow-validated chat body -> canonical; 400 for what cannot be carried."""
    for key, bad in UNTRANSLATABLE.items():
        if key in body and bad(body[key]):
            raise invalid(f"'{key}' has no equivalent in this model's upstream API; remove it", param=key,
                          code="unsupported_parameter")
    unknown = sorted(k for k in body if k not in KNOWN)
    if unknown:
        raise invalid(f"parameter(s) {', '.join(unknown)} have no equivalent in this model's upstream API",
                      param=unknown[0], code="unsupported_parameter")
    system: list[c.Text] = []
    messages: list[c.Message] = []
    for i, m in enumerate(body["messages"]):
        role, where = m.get("role"), f"messages[{i}].content"
        if role in ("system", "developer"):
            system.extend(p for p in _parts(m.get("content"), where, False) if isinstance(p, c.Text))
        elif role == "user":
            messages.append(c.Message("user", list(_parts(m.get("content"), where))))
        elif role == "assistant":
            messages.append(c.Message("assistant", _assistant_blocks(m, i)))
        elif role == "tool":
            tid = m.get("tool_call_id")
            if not isinstance(tid, str) or not tid:
                raise invalid(f"messages[{i}].tool_call_id is required for role 'tool'", param=f"messages[{i}].tool_call_id")
            res = c.ToolResult(tid, _parts(m.get("content"), where))
            if messages and messages[-1].role == "user" and all(isinstance(b, c.ToolResult) for b in messages[-1].content):
                messages[-1].content.append(res)
            else:
                messages.append(c.Message("user", [res]))
        else:
            raise invalid(f"messages[{i}].role {role!r} cannot be translated for this model's upstream", param=f"messages[{i}].role")
    _check_tool_results(messages)
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in EFFORT_BUDGET:
        raise invalid(f"'reasoning_effort' must be one of {', '.join(EFFORT_BUDGET)}", param="reasoning_effort")
    stop = body.get("stop")
    req = c.Request(
        model=body["model"],
        messages=messages,
        system=system,
        max_tokens=body.get("max_completion_tokens") or body.get("max_tokens"),
        temperature=_num(body.get("temperature")),
        top_p=_num(body.get("top_p")),
        top_k=body.get("top_k") if isinstance(body.get("top_k"), int) else None,
        stop=[stop] if isinstance(stop, str) else list(stop or []),
        stream=body.get("stream") is True,
        tools=_tools(body.get("tools")),
        tool_choice=_tool_choice(body.get("tool_choice")),
        parallel_tool_calls=body.get("parallel_tool_calls") if isinstance(body.get("parallel_tool_calls"), bool) else None,
        response_format=body.get("response_format") if (body.get("response_format") or {}).get("type") != "text" else None,
        user=body.get("user") if isinstance(body.get("user"), str) else None,
        include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
        seed=body.get("seed"),
        presence_penalty=_num(body.get("presence_penalty")),
        frequency_penalty=_num(body.get("frequency_penalty")),
        thinking_budget=EFFORT_BUDGET[effort] if effort is not None else None,
    )
    return req


def _assistant_blocks(m: dict[str, Any], i: int) -> list[c.Block]:
    blocks: list[c.Block] = []
    reasoning = m.get("reasoning_content", m.get("reasoning"))
    if isinstance(reasoning, str) and reasoning:
        sig = m.get("reasoning_signature")
        blocks.append(c.Thinking(reasoning, signature=sig if isinstance(sig, str) else None))
    blocks.extend(_parts(m.get("content"), f"messages[{i}].content", False))
    for j, tc in enumerate(m.get("tool_calls") or []):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(tc.get("id"), str):
            raise invalid(f"messages[{i}].tool_calls[{j}] must have an id and function.name", param=f"messages[{i}].tool_calls[{j}]")
        args = fn.get("arguments")
        blocks.append(c.ToolCall(tc["id"], fn["name"], args if isinstance(args, str) and args else "{}"))
    return blocks


def _check_tool_results(messages: list[c.Message]) -> None:
    """Every tool result must answer a call made in the assistant turn just before it."""
    prev_calls: dict[str, str] = {}
    for m in messages:
        for b in m.content:
            if isinstance(b, c.ToolResult):
                if b.tool_call_id not in prev_calls:
                    raise invalid(f"a tool message answers tool_call_id {b.tool_call_id!r}, but the assistant message "
                                  "before it made no such call", param="messages", code="unmatched_tool_result")
                b.name = prev_calls[b.tool_call_id]
        prev_calls = {b.id: b.name for b in m.content if isinstance(b, c.ToolCall)} if m.role == "assistant" else {}


def _tools(tools: Any) -> list[c.Tool]:
    out = []
    for i, t in enumerate(tools or []):
        fn = t.get("function")
        if t.get("type", "function") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid(f"tools[{i}]: only function tools can be translated for this model's upstream", param=f"tools[{i}]")
        params = fn.get("parameters")
        out.append(c.Tool(fn["name"], fn.get("description"), params if isinstance(params, dict) else {"type": "object", "properties": {}}))
    return out


def _tool_choice(tc: Any) -> c.ToolChoice | None:
    if tc is None:
        return None
    if tc in ("auto", "none"):
        return c.ToolChoice(tc)
    if tc == "required":
        return c.ToolChoice("any")
    if isinstance(tc, dict) and isinstance((tc.get("function") or {}).get("name"), str):
        return c.ToolChoice("tool", tc["function"]["name"])
    raise invalid("'tool_choice' must be auto, none, required or {type: function, function: {name}}", param="tool_choice")


# -- canonical -> OpenAI request (Anthropic or Gemini callers to OpenAI-compatible upstreams) ----
def _content_parts(blocks: list[c.Text | c.Image]) -> str | list[dict[str, Any]]:
    if all(isinstance(b, c.Text) for b in blocks):
        return "".join(b.text for b in blocks if isinstance(b, c.Text))
    parts: list[dict[str, Any]] = []
    for b in blocks:
        if isinstance(b, c.Text):
            parts.append({"type": "text", "text": b.text})
        else:
            url = b.url or f"data:{b.media_type or 'image/png'};base64,{b.data}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
    return parts


def request_from_canonical(req: c.Request, model: str) -> dict[str, Any]:
    msgs: list[dict[str, Any]] = []
    if req.system:
        msgs.append({"role": "system", "content": c.joined_text(req.system)})
    for m in req.messages:
        if m.role == "system":  # a mid-conversation system message: in place
            msgs.append({"role": "system", "content": c.joined_text(m.content)})
        elif m.role == "user":
            rest: list[c.Text | c.Image] = []
            for b in m.content:
                if isinstance(b, c.ToolResult):
                    content = _content_parts(b.content)
                    if b.is_error and isinstance(content, str):
                        content = "Error: " + content if content else "Error"
                    msgs.append({"role": "tool", "tool_call_id": b.tool_call_id, "content": content})
                elif isinstance(b, (c.Text, c.Image)):
                    rest.append(b)
            if rest or not any(isinstance(b, c.ToolResult) for b in m.content):
                msgs.append({"role": "user", "content": _content_parts(rest)})
        else:
            text = c.joined_text(m.content)
            calls = c.tool_calls_of(m.content)
            out: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
            thinking = "".join(b.text for b in m.content if isinstance(b, c.Thinking))
            if thinking or (calls and any(isinstance(b, c.Thinking) for b in m.content)):
                out["reasoning_content"] = thinking  # DeepSeek 400s on a tool turn without it
            if calls:
                out["tool_calls"] = [{"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}
                                     for t in calls]
            msgs.append(out)
    body: dict[str, Any] = {"model": model, "messages": msgs}
    if req.max_tokens is not None:
        body["max_tokens"] = req.max_tokens
    for key in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "user"):
        v = getattr(req, key)
        if v is not None:
            body[key] = v
    if req.top_k is not None:
        body["top_k"] = req.top_k  # vLLM/SGLang/DashScope extension
    if req.stop:
        body["stop"] = req.stop
    if req.tools:
        body["tools"] = [{"type": "function", "function": {"name": t.name, **({"description": t.description} if t.description else {}),
                                                           "parameters": t.parameters}} for t in req.tools]
    if req.tool_choice is not None and req.tools:  # OpenAI refuses tool_choice without tools
        tc = req.tool_choice
        body["tool_choice"] = ({"type": "function", "function": {"name": tc.name}} if tc.mode == "tool"
                               else "required" if tc.mode == "any" else tc.mode)
    if req.parallel_tool_calls is not None and req.tools:
        body["parallel_tool_calls"] = req.parallel_tool_calls
    if req.response_format is not None:
        body["response_format"] = req.response_format
    if req.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


# -- responses ------------------------------------------------------------------------------------
def usage_to_canonical(u: Any) -> c.Usage:
    if not isinstance(u, dict):
        return c.Usage()
    details = u.get("prompt_tokens_details")
    cached = reported_tokens(details.get("cached_tokens")) if isinstance(details, dict) else None
    if cached is None:
        cached = reported_tokens(u.get("prompt_cache_hit_tokens"))
    cd = u.get("completion_tokens_details")
    return c.Usage(reported_tokens(u.get("prompt_tokens"), "prompt_tokens") or 0,
                   reported_tokens(u.get("completion_tokens"), "completion_tokens") or 0, cached, None,
                   reported_tokens(cd.get("reasoning_tokens")) if isinstance(cd, dict) else None)


def usage_from_canonical(u: c.Usage) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens,
                           "total_tokens": u.input_tokens + u.output_tokens}
    if u.cache_read is not None:
        out["prompt_tokens_details"] = {"cached_tokens": u.cache_read}
    if u.reasoning is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": u.reasoning}
    return out


def response_to_canonical(obj: dict[str, Any]) -> c.Response:
    choices = obj.get("choices") or [{}]
    ch = choices[0] if isinstance(choices[0], dict) else {}
    msg = ch.get("message") or {}
    blocks = _assistant_blocks(msg, 0)
    reason = c.OPENAI_FINISH_TO_CANON.get(ch.get("finish_reason") or "stop", "end")
    return c.Response(str(obj.get("id") or ""), str(obj.get("model") or ""), blocks,
                      c.final_stop(reason, bool(c.tool_calls_of(blocks))), usage_to_canonical(obj.get("usage")))


def response_from_canonical(r: c.Response, model: str) -> dict[str, Any]:
    text = c.joined_text(r.content)
    calls = c.tool_calls_of(r.content)
    msg: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None, "refusal": None}
    thinking = [b for b in r.content if isinstance(b, c.Thinking) and not b.redacted]
    if thinking:
        msg["reasoning_content"] = "".join(b.text for b in thinking)
        sig = thinking[-1].signature
        if sig:
            msg["reasoning_signature"] = sig  # lets the next turn hand the thinking back to Anthropic intact
    if calls:
        msg["tool_calls"] = [{"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}
                             for t in calls]
    rid = r.id if r.id.startswith("chatcmpl") else "chatcmpl-" + r.id
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": msg, "logprobs": None,
                         "finish_reason": c.CANON_TO_OPENAI_FINISH.get(r.stop_reason, "stop")}],
            "usage": usage_from_canonical(r.usage)}


def chunk_bytes(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


Chunk = tuple[c.Usage | None, dict[str, Any] | None, str | None, Any]  # see read_chunk


def read_chunk(chunk: dict[str, Any]) -> Chunk:
    """An OpenAI chat chunk as every stream translator reads it, once: (its usage, canonical, or
    None; choice 0's delta, or None when the chunk has no choice 0; that delta's reasoning text
    (``reasoning_content``, DeepSeek's, else ``reasoning``, vLLM's and OpenRouter's), or None; its
    finish reason). Other choices are ignored (the translators carry one answer). Written for the
    common chunk (one choice, index 0, no usage): it costs no more than the inline reading it replaced."""
    u = chunk.get("usage")
    usage = usage_to_canonical(u) if u is not None and isinstance(u, dict) else None  # most chunks: None, one test
    choices = chunk.get("choices")
    if not choices:
        return usage, None, None, None
    ch = choices[0]
    if ch.get("index", 0) != 0:
        ch = next((x for x in choices if x.get("index", 0) == 0), None)
        if ch is None:
            return usage, None, None, None
    delta = ch.get("delta") or {}
    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
    return usage, delta, reasoning if reasoning and isinstance(reasoning, str) else None, ch.get("finish_reason")
