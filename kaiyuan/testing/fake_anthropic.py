"""A fake Anthropic Messages API upstream, in the wire format of Anthropic's public API reference:
POST /v1/messages (JSON, or SSE ``event: x\\ndata: {...}\\n\\n`` with message_start, content_block_start /
delta / stop, ping, message_delta, message_stop), POST /v1/messages/count_tokens, and error bodies
``{"type": "error", "error": {"type", "message"}, "request_id"}``.

Deterministic answers (like :mod:`kaiyuan.testing.fake_openai`): ``"echo: <last user text>"``; with tools
and no tool result yet, a ``tool_use`` of the first tool (or the forced one) with
``{"query": <text>, "n": i}`` (two calls when the text says "parallel"); after a tool result,
``"tool said: <result>"``; with ``thinking`` enabled, a signed thinking block first; a system prompt
asking for JSON gets ``{"answer": <text>}``. Faults are scripted with the same :class:`Behaviour`.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from typing import Any

import orjson
from aiohttp import web

from kaiyuan.testing.fake_openai import Behaviour, agent_call, count_tokens, endless

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               529: "overloaded_error"}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    out = []
    for b in content or []:
        if b.get("type") == "text":
            out.append(b.get("text", ""))
        elif b.get("type") == "tool_result":
            out.append(_text(b.get("content")))
    return " ".join(out)


def sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class FakeAnthropic:
    def __init__(self, *, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.script: deque[Behaviour] = deque()
        self.default = Behaviour()
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_post("/v1/messages", self.messages)
        self.app.router.add_post("/v1/messages/count_tokens", self.count)

    def next(self, *behaviours: Behaviour) -> None:
        self.script.extend(behaviours)

    def _error(self, status: int, message: str, etype: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
        body = {"type": "error", "error": {"type": etype or ERROR_TYPES.get(status, "api_error"), "message": message},
                "request_id": "req_" + os.urandom(8).hex()}
        return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)

    async def _pre(self, request: web.Request) -> tuple[dict[str, Any] | None, Behaviour, web.Response | None]:
        b = self.script.popleft() if self.script else self.default
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return None, b, self._error(400, "There was an issue with the format of your request: invalid JSON")
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.api_key is not None and request.headers.get("x-api-key") != self.api_key:
            return body, b, self._error(401, "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return body, b, self._error(400, "anthropic-version: header is required")
        if b.delay_first_byte:
            await asyncio.sleep(b.delay_first_byte)
        if b.raw_body is not None:
            return body, b, web.Response(status=b.status, body=b.raw_body, headers=b.headers)
        if b.status >= 400:
            return body, b, self._error(b.status, b.error_message or ("Overloaded" if b.status == 529 else f"scripted failure {b.status}"),
                                        b.error_type, b.headers)
        err = self._validate(body, request.path.endswith("count_tokens"))
        return body, b, (self._error(400, err) if err else None)

    def _validate(self, body: dict[str, Any], counting: bool) -> str | None:
        if not counting and not isinstance(body.get("max_tokens"), int):
            return "max_tokens: Field required"
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return "messages: at least one message is required"
        prev: set[str] = set()
        for i, m in enumerate(msgs):
            if m.get("role") == "system" and i > 0 and msgs[i - 1].get("role") == "user":
                continue  # a mid-conversation system message, right after a user turn (Claude Opus 4.8+)
            if m.get("role") not in ("user", "assistant"):
                return f"messages.{i}.role: Input should be 'user' or 'assistant'"
            blocks = m["content"] if isinstance(m.get("content"), list) else []
            for j, blk in enumerate(blocks):
                if blk.get("type") == "tool_result" and blk.get("tool_use_id") not in prev:
                    return (f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: "
                            f"{blk.get('tool_use_id')}. Each `tool_result` block must have a corresponding `tool_use` block in the previous message.")
                if blk.get("type") == "thinking" and not blk.get("signature"):
                    return f"messages.{i}.content.{j}.thinking.signature: Field required"
            prev = {blk["id"] for blk in blocks if blk.get("type") == "tool_use"}
        return None

    # -- answers ------------------------------------------------------------------------------------
    def _answer(self, body: dict[str, Any], b: Behaviour) -> tuple[list[dict[str, Any]], str, str | None]:
        msgs = body["messages"]
        last = msgs[-1]
        last_text = next((_text(m["content"]) for m in reversed(msgs) if m["role"] == "user"), "")
        blocks: list[dict[str, Any]] = []
        th = body.get("thinking") or {}
        if th.get("type") == "enabled":
            blocks.append({"type": "thinking", "thinking": f"thinking about: {last_text}", "signature": "sig_" + os.urandom(6).hex()})
        tools = body.get("tools") or []
        choice = body.get("tool_choice") or {}
        has_result = isinstance(last["content"], list) and any(x.get("type") == "tool_result" for x in last["content"])
        scripted = agent_call(b, [t.get("name") for t in tools]) if tools else None
        if scripted is not None:
            results = [_text(x.get("content")) for m in msgs if isinstance(m["content"], list)
                       for x in m["content"] if x.get("type") == "tool_result"]
            if results:
                return [*blocks, {"type": "text", "text": f"done: {results[-1].strip()}"}], "end_turn", None
            return [*blocks, {"type": "tool_use", "id": "toolu_agent" + os.urandom(6).hex(), "name": scripted[0], "input": scripted[1]}], "tool_use", None
        if tools and choice.get("type") != "none" and not has_result:
            names = [t["name"] for t in tools]
            if choice.get("type") == "tool":
                names = [choice["name"]]
            n = 2 if "parallel" in last_text and not choice.get("disable_parallel_tool_use") else 1
            for i in range(n):
                blocks.append({"type": "tool_use", "id": f"toolu_{i}{os.urandom(6).hex()}", "name": names[min(i, len(names) - 1)],
                               "input": {"query": last_text, "n": i}})
            return blocks, "tool_use", None
        text = f"tool said: {_text(last['content'])}" if has_result else (b.content if b.content is not None else f"echo: {last_text}")
        system = body.get("system")
        sys_text = system if isinstance(system, str) else " ".join(x.get("text", "") for x in system or [])
        if "JSON" in sys_text or ((body.get("output_config") or {}).get("format") or {}).get("type") == "json_schema":
            text = orjson.dumps({"answer": last_text}).decode()
        reason, seq = "end_turn", None
        for s in body.get("stop_sequences") or []:
            if s in text:
                text, reason, seq = text.split(s, 1)[0], "stop_sequence", s
                break
        words = text.split(" ")
        if len(words) > body["max_tokens"] and not b.ignore_max_tokens:
            text, reason = " ".join(words[: body["max_tokens"]]), "max_tokens"
        blocks.append({"type": "text", "text": text})
        return blocks, reason, seq

    def _usage(self, body: dict[str, Any], blocks: list[dict[str, Any]], b: Behaviour) -> dict[str, Any]:
        prompt = sum(count_tokens(_text(m["content"])) + 3 for m in body["messages"])
        out = sum(count_tokens(x.get("text") or x.get("thinking") or orjson.dumps(x.get("input")).decode()) for x in blocks)
        usage = {"input_tokens": prompt, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 2, "output_tokens": out}
        return {**usage, **(b.usage or {})}

    async def count(self, request: web.Request) -> web.StreamResponse:
        body, _b, early = await self._pre(request)
        if early is not None:
            return early
        assert body is not None
        return web.json_response({"input_tokens": sum(count_tokens(_text(m["content"])) + 3 for m in body["messages"])})

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body, b, early = await self._pre(request)
        if early is not None:
            return early
        assert body is not None
        blocks, reason, seq = self._answer(body, b)
        usage = self._usage(body, blocks, b)
        msg = {"id": "msg_" + os.urandom(12).hex(), "type": "message", "role": "assistant", "model": body.get("model"),
               "content": blocks, "stop_reason": reason, "stop_sequence": seq, "usage": usage}
        if not body.get("stream"):
            return web.Response(body=orjson.dumps(msg), content_type="application/json", headers=b.headers)
        start = {**msg, "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": {**usage, "output_tokens": 1}}
        events = [sse("message_start", {"type": "message_start", "message": start})]
        for i, blk in enumerate(blocks):
            kind = blk["type"]
            empty = {"type": "text", "text": ""} if kind == "text" else (
                {"type": "thinking", "thinking": ""} if kind == "thinking" else {**blk, "input": {}})
            events.append(sse("content_block_start", {"type": "content_block_start", "index": i, "content_block": empty}))
            if i == 0:
                events.append(sse("ping", {"type": "ping"}))
            if kind == "text":
                for k, w in enumerate(blk["text"].split(" ")):
                    d = {"type": "text_delta", "text": w if k == 0 else " " + w}
                    events.append(sse("content_block_delta", {"type": "content_block_delta", "index": i, "delta": d}))
            elif kind == "thinking":
                d = {"type": "thinking_delta", "thinking": blk["thinking"]}
                events.append(sse("content_block_delta", {"type": "content_block_delta", "index": i, "delta": d}))
                d = {"type": "signature_delta", "signature": blk["signature"]}
                events.append(sse("content_block_delta", {"type": "content_block_delta", "index": i, "delta": d}))
            else:
                # a call with no input streams only the empty delta, as Anthropic's own streams do
                args = orjson.dumps(blk["input"]).decode() if blk["input"] else ""
                for piece in ["", *(args[j:j + 6] for j in range(0, len(args), 6))]:
                    d = {"type": "input_json_delta", "partial_json": piece}
                    events.append(sse("content_block_delta", {"type": "content_block_delta", "index": i, "delta": d}))
            events.append(sse("content_block_stop", {"type": "content_block_stop", "index": i}))
        events.append(sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": seq},
                                            "usage": {"output_tokens": usage["output_tokens"]}}))
        if not b.omit_done:
            events.append(sse("message_stop", {"type": "message_stop"}))
        return await self._send(request, events, b)

    async def _send(self, request: web.Request, events: list[bytes], b: Behaviour) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **b.headers})
        await resp.prepare(request)
        for i, ev in enumerate(events):
            if b.endless is not None and i == b.endless_after:
                await endless(resp, b.endless)
                return resp  # the client hung up
            if b.drop_after_chunks is not None and i == b.drop_after_chunks:
                assert request.transport is not None
                request.transport.close()
                return resp
            if b.error_event_after_chunks is not None and i == b.error_event_after_chunks:
                await resp.write(sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
                break
            await resp.write(ev)
            if b.chunk_delay:
                await asyncio.sleep(b.chunk_delay)
        await resp.write_eof()
        return resp
