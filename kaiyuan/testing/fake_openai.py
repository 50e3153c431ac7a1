"""A fake OpenAI-compatible upstream that speaks the wire format of OpenAI's public API reference:
chat completions (JSON and SSE with ``data: [DONE]``, usage chunks, tool calls), legacy completions,
embeddings (float and base64), models, and OpenAI-shaped error bodies.

Answers are deterministic functions of the request, so tests can assert on them:
- chat: ``"echo: <last user text>"``; with ``tools`` (and ``tool_choice`` not "none") and no tool
  result yet, a call of the first tool with ``{"query": <last user text>}``; after a tool result,
  ``"tool said: <result>"``.
- models whose name contains ``reasoner`` or ``thinking`` also return DeepSeek-style
  ``reasoning_content`` and ``prompt_cache_hit_tokens`` / ``prompt_cache_miss_tokens``.

Faults are scripted with :class:`Behaviour`: a queue of one-shot behaviours, then a default. A
mid-stream error is the dialect's own event: chat's ``data: {"error": {...}}``, and for Responses
streams ``event: error`` with ``{"type": "error", "code", "message", "param", "sequence_number"}``
(the API reference's ResponseErrorEvent); ``endless`` streams bytes until the client hangs up.
"""

from __future__ import annotations

import asyncio
import base64
import random
import struct
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Behaviour:
    status: int = 200
    error_message: str | None = None
    error_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_first_byte: float = 0.0  # seconds before the response headers
    chunk_delay: float = 0.0  # seconds between stream chunks
    stall_after_chunks: int | None = None  # send N chunks, then hang forever
    drop_after_chunks: int | None = None  # send N chunks, then cut the connection
    omit_done: bool = False  # end the stream without data: [DONE]
    error_event_after_chunks: int | None = None  # send an error event mid-stream
    fail_rate: float = 0.0  # with this probability answer `status_on_fail`
    status_on_fail: int = 500
    content: str | None = None  # override the answer text
    raw_body: bytes | None = None  # answer exactly these bytes (with `status`)
    tool_calls: list[tuple[str, str]] | None = None  # answer with these calls: (function name, arguments JSON)
    ignore_max_tokens: bool = False  # a non-compliant upstream: answer in full whatever the output cap
    usage: dict[str, Any] | None = None  # fields put over the usage reported (absurd counts, strings...)
    raw_stream: list[bytes] | None = None  # a 2xx stream of exactly these chunks (with `headers`, e.g. Content-Encoding)
    endless: bytes | None = None  # after `endless_after` events, send these bytes again and again, until the client goes
    endless_after: int = 1        # (a runaway upstream: events with no tokens, or an endless SSE comment)
    echo_key: bool = False  # error messages quote the Authorization header received, as some vendors' do
    # An agent episode: when the request offers a tool named here (the first listed that is offered)
    # and holds no tool result yet, call it with these arguments; once it has a result, answer
    # "done: <result>". Requests without that tool get the usual echo.
    agent_tools: dict[str, dict[str, Any]] = field(default_factory=dict)


async def endless(resp: web.StreamResponse, unit: bytes) -> None:
    """Write ``unit`` (a MiB of it at a time) until the client hangs up."""
    block = unit * max(1, (1 << 20) // len(unit))
    try:
        while True:
            await resp.write(block)
    except ConnectionResetError:
        return


def agent_call(b: Behaviour, offered: list[str]) -> tuple[str, dict[str, Any]] | None:
    """The scripted shell call for a request offering ``offered`` tools, or None."""
    for name, args in b.agent_tools.items():
        if name in offered:
            return name, args
    return None


def count_tokens(text: str) -> int:
    return max(1, len(text.split())) if text else 0


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


class FakeOpenAI:
    def __init__(self, *, api_key: str | None = None, seed: int = 0) -> None:
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.script: deque[Behaviour] = deque()
        self.default = Behaviour()
        self.rng = random.Random(seed)
        self.active = 0
        self.max_active = 0
        self.cancelled = 0  # streams whose client went away before the end
        self.app = self._build()

    # -- scripting ---------------------------------------------------------------------------
    def next(self, *behaviours: Behaviour) -> None:
        self.script.extend(behaviours)

    def _behaviour(self) -> Behaviour:
        return self.script.popleft() if self.script else self.default

    def _build(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/responses", self.responses)
        return app

    # -- shared ----------------------------------------------------------------------------------
    def _error(self, status: int, message: str, etype: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
        etype = etype or {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                          429: "rate_limit_exceeded" if False else "requests", 500: "server_error",
                          503: "server_error"}.get(status, "server_error")
        code = {401: "invalid_api_key", 429: "rate_limit_exceeded", 404: "model_not_found"}.get(status)
        body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
        return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)

    async def _pre(self, request: web.Request) -> tuple[dict[str, Any] | None, Behaviour, web.Response | None]:
        b = self._behaviour()
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None, b, self._error(400, "We could not parse the JSON body of your request.")
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.api_key is not None and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return body, b, self._error(401, "Incorrect API key provided.")
        if b.delay_first_byte:
            await asyncio.sleep(b.delay_first_byte)
        if b.raw_body is not None:
            return body, b, web.Response(status=b.status, body=b.raw_body, headers=b.headers)
        if b.fail_rate and self.rng.random() < b.fail_rate:
            return body, b, self._error(b.status_on_fail, "The server had an error while processing your request.", headers=b.headers)
        if b.status >= 400:
            msg = b.error_message or f"scripted failure {b.status}"
            if b.echo_key:
                msg += f" (request sent with Authorization: {request.headers.get('Authorization')})"
            return body, b, self._error(b.status, msg, b.error_type, b.headers)
        return body, b, None

    # -- chat ------------------------------------------------------------------------------------
    def _answer(self, body: dict[str, Any], b: Behaviour) -> dict[str, Any]:
        msgs = body.get("messages") or []
        last_user = next((_text_of(m.get("content")) for m in reversed(msgs) if m.get("role") == "user"), "")
        last = msgs[-1] if msgs else {}
        tools = body.get("tools")
        reasoning = None
        model = str(body.get("model", ""))
        if "reasoner" in model or "thinking" in model:
            reasoning = f"thinking about: {last_user}"
        if b.tool_calls:  # scripted: exactly these calls
            calls = [{"id": f"call_s{i}_{self.rng.randrange(10**8)}", "type": "function",
                      "function": {"name": name, "arguments": args}} for i, (name, args) in enumerate(b.tool_calls)]
            return {"content": None, "tool_calls": calls, "reasoning": reasoning, "finish": "tool_calls", "user": last_user}
        offered = [t.get("function", {}).get("name") for t in tools or []]
        scripted = agent_call(b, offered) if tools else None
        if scripted is not None:
            if any(m.get("role") == "tool" for m in msgs):
                result = next(_text_of(m.get("content")) for m in reversed(msgs) if m.get("role") == "tool")
                return {"content": f"done: {result.strip()}", "tool_calls": None, "reasoning": reasoning, "finish": "stop",
                        "user": last_user}
            call = {"id": f"call_agent_{abs(hash(last_user)) % 10**8}", "type": "function",
                    "function": {"name": scripted[0], "arguments": orjson.dumps(scripted[1]).decode()}}
            return {"content": None, "tool_calls": [call], "reasoning": reasoning, "finish": "tool_calls", "user": last_user}
        if tools and body.get("tool_choice") != "none" and last.get("role") != "tool":
            calls = []
            n_calls = 2 if body.get("parallel_tool_calls") is not False and "parallel" in last_user else 1
            for i in range(n_calls):
                fn = tools[min(i, len(tools) - 1)]["function"]["name"]
                calls.append({"id": f"call_{i}_{abs(hash(last_user)) % 10**8}", "type": "function",
                              "function": {"name": fn, "arguments": orjson.dumps({"query": last_user, "n": i}).decode()}})
            return {"content": None, "tool_calls": calls, "reasoning": reasoning, "finish": "tool_calls", "user": last_user}
        if last.get("role") == "tool":
            text = f"tool said: {_text_of(last.get('content'))}"
        else:
            text = b.content if b.content is not None else f"echo: {last_user}"
        finish = "stop"
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(max_tokens, int) and count_tokens(text) > max_tokens and not b.ignore_max_tokens:
            text = " ".join(text.split()[:max_tokens])
            finish = "length"
        rf = body.get("response_format") or {}
        if rf.get("type") in ("json_object", "json_schema"):
            text = orjson.dumps({"answer": last_user}).decode()
        return {"content": text, "tool_calls": None, "reasoning": reasoning, "finish": finish, "user": last_user}

    def _usage(self, body: dict[str, Any], ans: dict[str, Any], b: Behaviour) -> dict[str, Any]:
        prompt = sum(count_tokens(_text_of(m.get("content"))) + 3 for m in body.get("messages") or [])
        completion = count_tokens(ans["content"] or "") + sum(
            count_tokens(c["function"]["arguments"]) for c in ans["tool_calls"] or []
        )
        reasoning = count_tokens(ans["reasoning"]) if ans["reasoning"] else 0
        cached = prompt // 2
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion + reasoning,
            "total_tokens": prompt + completion + reasoning,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        }
        if ans["reasoning"]:
            usage["prompt_cache_hit_tokens"] = cached
            usage["prompt_cache_miss_tokens"] = prompt - cached
        return {**usage, **(b.usage or {})}

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body, b, early = await self._pre(request)
        if early is not None:
            return early
        assert body is not None
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return self._error(400, "Invalid 'messages': empty array. Expected an array with minimum length 1.")
        if "reasoner" in str(body.get("model", "")):  # DeepSeek thinking mode: tool turns must echo their reasoning
            for i, m in enumerate(body["messages"]):
                if m.get("role") == "assistant" and m.get("tool_calls") and "reasoning_content" not in m:
                    return self._error(400, f"Missing reasoning_content field in the assistant message at message index {i}.")
        ans = self._answer(body, b)
        cid = f"chatcmpl-{int(time.time() * 1000)}{self.rng.randrange(10**6)}"
        created = int(time.time())
        model = body.get("model")
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": ans["content"], "refusal": None}
            if ans["reasoning"]:
                message["reasoning_content"] = ans["reasoning"]
            if ans["tool_calls"]:
                message["tool_calls"] = ans["tool_calls"]
            n = body.get("n") or 1
            resp = {
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [{"index": i, "message": message, "logprobs": None, "finish_reason": ans["finish"]} for i in range(n)],
                "usage": self._usage(body, ans, b),
            }
            return web.Response(body=orjson.dumps(resp), content_type="application/json", headers=b.headers)
        return await self._stream_chat(request, body, b, ans, cid, created, model)

    async def _stream_chat(self, request: web.Request, body: dict[str, Any], b: Behaviour, ans: dict[str, Any],
                           cid: str, created: int, model: Any) -> web.StreamResponse:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": "fp_fake"}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            c = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if include_usage:
                c["usage"] = None
            return b"data: " + orjson.dumps(c) + b"\n\n"

        events = [chunk({"role": "assistant", "content": "", "refusal": None})]
        if ans["reasoning"]:
            events += [chunk({"reasoning_content": w + " "}) for w in ans["reasoning"].split()]
        if ans["tool_calls"]:
            for i, call in enumerate(ans["tool_calls"]):
                events.append(chunk({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                                     "function": {"name": call["function"]["name"], "arguments": ""}}]}))
                args = call["function"]["arguments"]
                for j in range(0, len(args), 7):
                    events.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": args[j:j + 7]}}]}))
        else:
            words = (ans["content"] or "").split(" ")
            events += [chunk({"content": (w if i == 0 else " " + w)}) for i, w in enumerate(words)]
        events.append(chunk({}, ans["finish"]))
        if include_usage:
            events.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": self._usage(body, ans, b)}) + b"\n\n")
        return await self._send_stream(request, events, b)

    async def _send_stream(self, request: web.Request, events: list[bytes], b: Behaviour,
                           error: bytes | None = None) -> web.StreamResponse:
        """``events``, with ``b``'s faults; ``error`` is the dialect's error event (default: chat's)."""
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **b.headers})
        await resp.prepare(request)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        finished = False
        if b.raw_stream is not None:
            events = b.raw_stream
        try:
            for i, ev in enumerate(events):
                if b.endless is not None and i == b.endless_after:
                    await endless(resp, b.endless)
                    return resp  # the client hung up
                if b.stall_after_chunks is not None and i == b.stall_after_chunks:
                    await asyncio.sleep(3600)
                if b.drop_after_chunks is not None and i == b.drop_after_chunks:
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                if b.error_event_after_chunks is not None and i == b.error_event_after_chunks:
                    msg = "The server had an error while processing your request."
                    if b.echo_key:
                        msg += f" (key: {request.headers.get('Authorization')})"
                    err = {"error": {"message": msg, "type": "server_error", "param": None, "code": None}}
                    await resp.write(error if error is not None else b"data: " + orjson.dumps(err) + b"\n\n")
                    return resp
                await resp.write(ev)
                if b.chunk_delay:
                    await asyncio.sleep(b.chunk_delay)
            if not b.omit_done:
                await resp.write(b"data: [DONE]\n\n")
            finished = True
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        finally:
            self.active -= 1
            if not finished:
                self.cancelled += 1
        return resp

    # -- completions / embeddings / models ---------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        body, b, early = await self._pre(request)
        if early is not None:
            return early
        assert body is not None
        prompt = body.get("prompt")
        first = prompt if isinstance(prompt, str) else (prompt or [""])[0]
        text = b.content if b.content is not None else f"completed: {first}"
        usage = {"prompt_tokens": count_tokens(str(prompt)), "completion_tokens": count_tokens(text),
                 "total_tokens": count_tokens(str(prompt)) + count_tokens(text)}
        cid = f"cmpl-{self.rng.randrange(10**9)}"
        base = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": body.get("model")}
        if not body.get("stream"):
            resp = {**base, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}], "usage": usage}
            return web.Response(body=orjson.dumps(resp), content_type="application/json")
        events = [b"data: " + orjson.dumps({**base, "choices": [{"text": w, "index": 0, "logprobs": None, "finish_reason": None}]}) + b"\n\n"
                  for w in text.split(" ")]
        events.append(b"data: " + orjson.dumps({**base, "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}]}) + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
        return await self._send_stream(request, events, b)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body, _b, early = await self._pre(request)
        if early is not None:
            return early
        assert body is not None
        inputs = body.get("input")
        items = [inputs] if isinstance(inputs, str) else list(inputs or [])
        dims = body.get("dimensions") or 8
        data = []
        for i, text in enumerate(items):
            rng = random.Random(str(text))
            vec = [rng.uniform(-1, 1) for _ in range(dims)]
            emb: Any = vec
            if body.get("encoding_format") == "base64":
                emb = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = sum(count_tokens(str(t)) for t in items)
        resp = {"object": "list", "data": data, "model": body.get("model"), "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return web.Response(body=orjson.dumps(resp), content_type="application/json")

    # -- responses (an upstream that speaks the Responses API itself) ----------------------------
    async def responses(self, request: web.Request) -> web.StreamResponse:
        """``"echo: <input>"`` (or ``Behaviour.content``) as a Responses object, or its event stream,
        one ``output_text.delta`` per word: the shape of the recorded response in
        tests/fixtures/openai/responses_text.json. ``max_output_tokens`` is honoured (words cut,
        status ``incomplete``) unless ``ignore_max_tokens``; ``tool_calls`` answers with
        ``function_call`` items instead, their arguments streamed three characters a delta."""
        body, b, early = await self._pre(request)
        if early is not None:
            return early
        assert body is not None
        inp = body.get("input")
        text = b.content if b.content is not None else \
            f"echo: {inp if isinstance(inp, str) else _text_of((inp or [{}])[-1].get('content'))}"
        cap = body.get("max_output_tokens")
        status, incomplete = "completed", None
        if isinstance(cap, int) and count_tokens(text) > cap and not b.ignore_max_tokens and not b.tool_calls:
            text, status, incomplete = " ".join(text.split()[:cap]), "incomplete", {"reason": "max_output_tokens"}
        msg = {"id": "msg_fake1", "type": "message", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}]}
        calls = [{"id": f"fc_fake{i}", "type": "function_call", "status": "completed", "call_id": f"call_fake{i}",
                  "name": name, "arguments": args} for i, (name, args) in enumerate(b.tool_calls or [])]
        output: list[dict[str, Any]] = calls or [msg]
        words = sum(count_tokens(c["arguments"]) for c in calls) if calls else count_tokens(text)
        resp: dict[str, Any] = {
            "id": f"resp_fake{self.rng.randrange(10**8)}", "object": "response", "created_at": int(time.time()),
            "status": status, "error": None, "incomplete_details": incomplete, "model": body.get("model"),
            "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": {"input_tokens": 7, "input_tokens_details": {"cached_tokens": 2}, "output_tokens": words,
                      "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 7 + words}}
        if not body.get("stream"):
            return web.Response(body=orjson.dumps(resp), content_type="application/json", headers=b.headers)
        start = {**resp, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
        evs: list[dict[str, Any]] = [{"type": "response.created", "response": start},
                                     {"type": "response.in_progress", "response": start}]
        for i, item in enumerate(output):
            evs += _response_item_events(i, item)
        evs.append({"type": "response.completed" if status == "completed" else "response.incomplete", "response": resp})
        events = [f"event: {e['type']}\ndata: ".encode() + orjson.dumps({**e, "sequence_number": i}) + b"\n\n"
                  for i, e in enumerate(evs)]
        error = b"event: error\ndata: " + orjson.dumps({
            "type": "error", "code": "server_error", "message": "The server had an error while processing your request.",
            "param": None, "sequence_number": b.error_event_after_chunks or 0}) + b"\n\n"
        return await self._send_stream(request, events, replace(b, omit_done=True), error)  # no [DONE] in Responses streams

    async def models(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"}]}),
                            content_type="application/json")


def _response_item_events(i: int, item: dict[str, Any]) -> list[dict[str, Any]]:
    """The stream events of one finished output item (a message with one text part, or a function call)."""
    iid = item["id"]
    if item["type"] == "function_call":
        args = item["arguments"]
        return [{"type": "response.output_item.added", "output_index": i,
                 "item": {**item, "status": "in_progress", "arguments": ""}},
                *({"type": "response.function_call_arguments.delta", "item_id": iid, "output_index": i,
                   "delta": args[k:k + 3]} for k in range(0, len(args), 3)),
                {"type": "response.function_call_arguments.done", "item_id": iid, "output_index": i, "arguments": args},
                {"type": "response.output_item.done", "output_index": i, "item": item}]
    text = item["content"][0]["text"]
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
    where = {"item_id": iid, "output_index": i, "content_index": 0}
    return [{"type": "response.output_item.added", "output_index": i, "item": {**item, "status": "in_progress", "content": []}},
            {"type": "response.content_part.added", **where, "part": part},
            *({"type": "response.output_text.delta", **where, "delta": w if k == 0 else " " + w, "logprobs": []}
              for k, w in enumerate(text.split(" "))),
            {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
            {"type": "response.content_part.done", **where, "part": {**part, "text": text}},
            {"type": "response.output_item.done", "output_index": i, "item": item}]
