"""A fake Gemini API upstream, in the wire format of Google's public API reference:
``POST /v1beta/models/{model}:generateContent`` (a GenerateContentResponse) and
``:streamGenerateContent?alt=sse`` (``data: {GenerateContentResponse}`` events, the last one with
``finishReason`` and ``usageMetadata``, no terminator), keys in ``x-goog-api-key``, and error bodies
``{"error": {"code", "message", "status"}}``.

Deterministic answers: ``"echo: <last user text>"``; with function declarations (mode not NONE) and
no function response yet, ``functionCall`` parts for the first (or only allowed) function with
``{"query": <text>, "n": i}`` (two when the text says "parallel") and, like the real API,
finishReason ``STOP``; after a function response, ``"tool said: <response>"``; thoughts when
``thinkingConfig.includeThoughts``; ``{"answer": <text>}`` when ``responseMimeType`` is JSON.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from typing import Any

import orjson
from aiohttp import web

from kaiyuan.testing.fake_openai import Behaviour, agent_call, count_tokens, endless

STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
          429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def _text(parts: list[dict[str, Any]]) -> str:
    out = []
    for p in parts:
        if "text" in p:
            out.append(p["text"])
        elif "functionResponse" in p:
            r = p["functionResponse"].get("response") or {}
            out.append(str(r.get("result", orjson.dumps(r).decode())))
    return " ".join(out)


class FakeGemini:
    def __init__(self, *, api_key: str | None = None, require_thought_signatures: bool = True) -> None:
        self.api_key = api_key
        self.require_thought_signatures = require_thought_signatures  # like Gemini 3
        self.requests: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.script: deque[Behaviour] = deque()
        self.default = Behaviour()
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_post("/v1beta/models/{target}", self.handle)

    def next(self, *behaviours: Behaviour) -> None:
        self.script.extend(behaviours)

    def _error(self, code: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
        body = {"error": {"code": code, "message": message, "status": STATUS.get(code, "UNKNOWN")}}
        return web.Response(status=code, body=orjson.dumps(body), content_type="application/json", headers=headers)

    def _validate(self, body: dict[str, Any]) -> str | None:
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            return "* GenerateContentRequest.contents: contents is not specified"
        for i, ct in enumerate(contents):
            if ct.get("role") not in ("user", "model"):
                return f"Please use a valid role: user, model. (contents[{i}])"
            calls = [p for p in ct.get("parts") or [] if "functionCall" in p]
            if calls and self.require_thought_signatures and not calls[0].get("thoughtSignature"):
                return (f"Function call is missing a thought_signature in functionCall parts. This is required for tools "
                        f"to work correctly. (contents[{i}])")
            for j, p in enumerate(ct.get("parts") or []):
                fc = p.get("functionCall")
                if fc is not None and (not fc.get("name") or not isinstance(fc.get("args", {}), dict)):
                    return f"* GenerateContentRequest.contents[{i}].parts[{j}].function_call: name and object args required"
                fr = p.get("functionResponse")
                if fr is not None and (not fr.get("name") or not isinstance(fr.get("response"), dict)):
                    return f"* GenerateContentRequest.contents[{i}].parts[{j}].function_response: name and object response required"
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        b = self.script.popleft() if self.script else self.default
        target = request.match_info["target"]
        model, _, action = target.partition(":")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return self._error(400, "Invalid JSON payload received.")
        self.requests.append(body)
        self.paths.append(str(request.rel_url))
        self.headers.append(dict(request.headers))
        if self.api_key is not None and request.headers.get("x-goog-api-key") != self.api_key:
            return self._error(400, "API key not valid. Please pass a valid API key.")
        if action not in ("generateContent", "streamGenerateContent"):
            return self._error(404, f"Method {action} not found")
        if b.delay_first_byte:
            await asyncio.sleep(b.delay_first_byte)
        if b.status >= 400:
            msg = b.error_message or ("The model is overloaded. Please try again later." if b.status == 503 else f"scripted failure {b.status}")
            return self._error(b.status, msg, b.headers)
        err = self._validate(body)
        if err:
            return self._error(400, err)
        parts, finish = self._answer(body, b)
        usage = self._usage(body, parts)
        if action == "generateContent":
            resp = {"candidates": [{"content": {"parts": parts, "role": "model"}, "finishReason": finish, "index": 0}],
                    "usageMetadata": usage, "modelVersion": model, "responseId": os.urandom(8).hex()}
            return web.Response(body=orjson.dumps(resp), content_type="application/json")
        if request.query.get("alt") != "sse":
            return self._error(400, "this fake only streams with alt=sse")
        return await self._stream(request, model, parts, finish, usage, b)

    def _answer(self, body: dict[str, Any], b: Behaviour) -> tuple[list[dict[str, Any]], str]:
        contents = body["contents"]
        last = contents[-1]
        last_text = next((_text(ct["parts"]) for ct in reversed(contents)
                          if ct["role"] == "user" and any("text" in p for p in ct["parts"])), "")
        gc = body.get("generationConfig") or {}
        parts: list[dict[str, Any]] = []
        if (gc.get("thinkingConfig") or {}).get("includeThoughts"):
            parts.append({"text": f"thinking about: {last_text}", "thought": True})
        decls = [d for t in body.get("tools") or [] for d in t.get("functionDeclarations") or []]
        fcc = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
        answered = any("functionResponse" in p for p in last["parts"])
        scripted = agent_call(b, [d.get("name") for d in decls]) if decls else None
        if scripted is not None:  # an agent episode (see Behaviour.agent_tools)
            results = [p["functionResponse"].get("response") for ct in contents for p in ct["parts"] if "functionResponse" in p]
            if results:
                r = results[-1]
                text = r.get("output", r.get("result")) if isinstance(r, dict) else None
                parts.append({"text": f"done: {str(text if text is not None else orjson.dumps(r).decode()).strip()}"})
                return parts, "STOP"
            parts.append({"functionCall": {"name": scripted[0], "args": scripted[1]},
                          "thoughtSignature": "CiQB0e2Kb+" + os.urandom(9).hex() + "/x=="})
            return parts, "STOP"
        if decls and fcc.get("mode") != "NONE" and not answered:
            names = fcc.get("allowedFunctionNames") or [d["name"] for d in decls]
            for i in range(2 if "parallel" in last_text else 1):
                part: dict[str, Any] = {"functionCall": {"name": names[min(i, len(names) - 1)], "args": {"query": last_text, "n": i}}}
                if i == 0:  # Gemini signs the first call of a step
                    part["thoughtSignature"] = "CiQB0e2Kb+" + os.urandom(9).hex() + "/x=="
                parts.append(part)
            return parts, "STOP"
        text = f"tool said: {_text(last['parts'])}" if answered else (b.content if b.content is not None else f"echo: {last_text}")
        if gc.get("responseMimeType") == "application/json":
            text = orjson.dumps({"answer": last_text}).decode()
        finish = "STOP"
        for s in gc.get("stopSequences") or []:
            if s in text:
                text = text.split(s, 1)[0]
        mx = gc.get("maxOutputTokens")
        if isinstance(mx, int) and len(text.split(" ")) > mx and not b.ignore_max_tokens:
            text, finish = " ".join(text.split(" ")[:mx]), "MAX_TOKENS"
        parts.append({"text": text})
        return parts, finish

    def _usage(self, body: dict[str, Any], parts: list[dict[str, Any]]) -> dict[str, Any]:
        prompt = sum(count_tokens(_text(ct["parts"])) + 2 for ct in body["contents"])
        thoughts = sum(count_tokens(p["text"]) for p in parts if p.get("thought"))
        cand = sum(count_tokens(p["text"]) if "text" in p else count_tokens(orjson.dumps(p["functionCall"]["args"]).decode())
                   for p in parts if not p.get("thought"))
        u = {"promptTokenCount": prompt, "candidatesTokenCount": cand, "totalTokenCount": prompt + cand + thoughts}
        if thoughts:
            u["thoughtsTokenCount"] = thoughts
        return u

    async def _stream(self, request: web.Request, model: str, parts: list[dict[str, Any]], finish: str,
                      usage: dict[str, Any], b: Behaviour) -> web.StreamResponse:
        rid = os.urandom(8).hex()
        pieces: list[dict[str, Any]] = []
        for p in parts:
            if "text" in p and not p.get("thought"):
                words = p["text"].split(" ")
                pieces += [{"text": (w if k == 0 else " " + w)} for k, w in enumerate(words)]
            else:
                pieces.append(p)
        events = []
        for k, p in enumerate(pieces):
            cand: dict[str, Any] = {"content": {"parts": [p], "role": "model"}, "index": 0}
            chunk: dict[str, Any] = {"candidates": [cand], "modelVersion": model, "responseId": rid}
            if k == len(pieces) - 1:
                cand["finishReason"] = finish
                chunk["usageMetadata"] = usage
            else:
                chunk["usageMetadata"] = {"promptTokenCount": usage["promptTokenCount"], "totalTokenCount": usage["promptTokenCount"]}
            events.append(b"data: " + orjson.dumps(chunk) + b"\r\n\r\n")
        if b.omit_done:
            events = events[:-1]
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream", **b.headers})
        await resp.prepare(request)
        for i, ev in enumerate(events):
            if b.endless is not None and i == b.endless_after:
                await endless(resp, b.endless)
                return resp  # the client hung up
            if b.drop_after_chunks is not None and i == b.drop_after_chunks:
                assert request.transport is not None
                request.transport.close()
                return resp
            await resp.write(ev)
            if b.chunk_delay:
                await asyncio.sleep(b.chunk_delay)
        await resp.write_eof()
        return resp
