"""Stream translators: small state machines fed one upstream event at a time.

- :class:`OpenAIToAnthropic`: OpenAI chat chunks -> Anthropic Messages SSE events (bytes).
- :class:`AnthropicToOpenAI`: Anthropic events -> OpenAI chat chunks (dicts).
- :class:`GeminiToOpenAI`: Gemini ``streamGenerateContent?alt=sse`` responses -> OpenAI chunks.

Gemini -> Anthropic is the composition of the last and the first. Parallel tool calls and
streamed tool arguments are carried index by index; a reply that called a tool always ends with
``tool_use`` / ``tool_calls``, whatever finish reason the upstream gave.
"""

from __future__ import annotations

import os
import time
from typing import Any

from kaiyuan.dialects import anthropic as anth
from kaiyuan.dialects import canonical as c
from kaiyuan.dialects import gemini as gem
from kaiyuan.dialects import gemini_in
from kaiyuan.dialects import openai_chat as oc
from kaiyuan.dialects.openai_chat import read_chunk
from kaiyuan.errors import ErrorKind, GatewayError


class OpenAIToAnthropic:
    """One content block open at a time, as Anthropic's stream has it. The first tool call streams
    live; a tool call that starts while another is open (parallel calls), and anything after it, is
    buffered per tool index and sent whole, in order, once the open one is complete (at the end):
    an upstream that interleaves the argument deltas of parallel calls still yields well-formed
    blocks. ``input_tokens`` is the prompt size for ``message_start`` (the upstream reports usage
    only at the end)."""

    def __init__(self, model: str, input_tokens: int = 0) -> None:
        self.model = model
        self.id = anth.new_message_id()
        self.started = False
        self.done = False
        self.next_index = 0
        self.open: dict[int, str] = {}  # block index -> "text" | "thinking" | "tool"
        self.current: int | None = None  # the open text/thinking block
        self.tools: dict[int, int] = {}  # OpenAI tool_calls index -> block index (streamed live)
        self.pending: dict[int, list[str]] = {}  # OpenAI tool_calls index -> [id, name, arguments] (buffered)
        self.pending_text: list[str] = []  # text that came while a tool block was open
        self.finish: str | None = None
        self.usage = c.Usage(input_tokens=input_tokens)

    def _start(self) -> list[bytes]:
        self.started = True
        msg: dict[str, Any] = {"id": self.id, "type": "message", "role": "assistant", "content": [], "model": self.model,
               "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": self.usage.input_tokens, "output_tokens": 0}}
        return [anth.sse("message_start", {"type": "message_start", "message": msg}), anth.sse("ping", {"type": "ping"})]

    def _close(self, idx: int) -> bytes:
        del self.open[idx]
        if self.current == idx:
            self.current = None
        return anth.sse("content_block_stop", {"type": "content_block_stop", "index": idx})

    def _open(self, kind: str, block: dict[str, Any]) -> list[bytes]:
        out = [self._close(i) for i in sorted(self.open)]
        idx = self.next_index
        self.next_index += 1
        self.open[idx] = kind
        if kind != "tool":
            self.current = idx
        out.append(anth.sse("content_block_start", {"type": "content_block_start", "index": idx, "content_block": block}))
        return out

    def _delta(self, idx: int, delta: dict[str, Any]) -> bytes:
        return anth.sse("content_block_delta", {"type": "content_block_delta", "index": idx, "delta": delta})

    def feed(self, chunk: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        usage, delta, reasoning, finish = read_chunk(chunk)
        if usage is not None:
            self.usage = usage
        if not self.started:
            out += self._start()
        if delta is None:
            return out
        if reasoning is not None:
            if self.current is None or self.open[self.current] != "thinking":
                out += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            assert self.current is not None
            out.append(self._delta(self.current, {"type": "thinking_delta", "thinking": reasoning}))
        sig = delta.get("reasoning_signature")
        if isinstance(sig, str) and sig and self.current is not None and self.open[self.current] == "thinking":
            out.append(self._delta(self.current, {"type": "signature_delta", "signature": sig}))
        text = delta.get("content")
        if isinstance(text, str) and text and (self.pending or any(k == "tool" for k in self.open.values())):
            self.pending_text.append(text)  # a tool block is open: text waits for it to end
        elif isinstance(text, str) and text:
            if self.current is None or self.open[self.current] != "text":
                out += self._open("text", {"type": "text", "text": ""})
            assert self.current is not None
            out.append(self._delta(self.current, {"type": "text_delta", "text": text}))
        for tc in delta.get("tool_calls") or ():
            out += self._tool_delta(tc)
        if finish:
            self.finish = finish
        return out

    def _tool_delta(self, tc: dict[str, Any]) -> list[bytes]:
        ti = tc.get("index", 0)
        fn = tc.get("function") or {}
        raw = fn.get("arguments")
        args: str = raw if isinstance(raw, str) else ""
        if ti in self.pending:
            self.pending[ti][2] += args
            return []
        if ti not in self.tools:
            tid = tc.get("id") or f"toolu_{os.urandom(8).hex()}"
            if any(k == "tool" for k in self.open.values()) or self.pending:  # another call is open: buffer this one
                self.pending[ti] = [tid, fn.get("name") or "", args]
                return []
            out = self._start_tool(ti, tid, fn.get("name") or "")
        else:
            out = []
        if args and self.tools[ti] in self.open:
            out.append(self._delta(self.tools[ti], {"type": "input_json_delta", "partial_json": args}))
        return out

    def _start_tool(self, ti: int, tid: str, name: str) -> list[bytes]:
        out = [self._close(i) for i in sorted(self.open)]
        block: dict[str, Any] = {"type": "tool_use", "id": tid, "name": name, "input": {}}
        idx = self.next_index
        self.next_index += 1
        self.open[idx] = "tool"
        self.tools[ti] = idx
        out.append(anth.sse("content_block_start", {"type": "content_block_start", "index": idx, "content_block": block}))
        return out

    def _flush_pending(self) -> list[bytes]:
        """The buffered tool calls (whole, in index order) and text, each block closed before the next."""
        out: list[bytes] = []
        for ti in sorted(self.pending):
            tid, name, args = self.pending[ti]
            out += self._start_tool(ti, tid, name)
            if args:
                out.append(self._delta(self.tools[ti], {"type": "input_json_delta", "partial_json": args}))
        self.pending.clear()
        if self.pending_text:
            out += self._open("text", {"type": "text", "text": ""})
            assert self.current is not None
            out.append(self._delta(self.current, {"type": "text_delta", "text": "".join(self.pending_text)}))
            self.pending_text.clear()
        return out

    def end(self) -> list[bytes]:
        """After ``data: [DONE]``: the buffered blocks, close the last one, then message_delta (stop
        reason, usage) and message_stop."""
        out = [] if self.started else self._start()
        out += self._flush_pending()
        out += [self._close(i) for i in sorted(self.open)]
        reason = c.final_stop(c.OPENAI_FINISH_TO_CANON.get(self.finish or "stop", "end"), bool(self.tools))
        usage = anth.usage_from_canonical(self.usage)
        out.append(anth.sse("message_delta", {"type": "message_delta", "delta": {
            "stop_reason": c.CANON_TO_ANTHROPIC_STOP.get(reason, "end_turn"), "stop_sequence": None}, "usage": usage}))
        out.append(anth.sse("message_stop", {"type": "message_stop"}))
        self.done = True
        return out


class _OpenAIChunks:
    """Builds OpenAI chat chunks with a fixed id/model/created."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.base = {"id": "chatcmpl-" + os.urandom(12).hex(), "object": "chat.completion.chunk",
                     "created": int(time.time()), "model": model}
        self.include_usage = include_usage
        self.usage = c.Usage()
        self.tool_count = 0
        self.done = False

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        ch = {**self.base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if self.include_usage:
            ch["usage"] = None
        return ch

    def final(self, reason: str) -> list[dict[str, Any]]:
        self.done = True
        out = [self.chunk({}, c.CANON_TO_OPENAI_FINISH.get(reason, "stop"))]
        if self.include_usage:
            out.append({**self.base, "choices": [], "usage": oc.usage_from_canonical(self.usage)})
        return out


class AnthropicToOpenAI(_OpenAIChunks):
    def __init__(self, model: str, include_usage: bool) -> None:
        super().__init__(model, include_usage)
        self.tools: dict[int, int] = {}  # Anthropic block index -> OpenAI tool index
        self.no_args: set[int] = set()  # tool blocks with no argument text yet
        self.stop: str | None = None

    def feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        kind = event.get("type")
        if kind == "content_block_delta":
            d = event.get("delta") or {}
            dk = d.get("type")
            if dk == "text_delta":
                return [self.chunk({"content": d.get("text", "")})]
            if dk == "thinking_delta":
                return [self.chunk({"reasoning_content": d.get("thinking", "")})]
            if dk == "input_json_delta" and event.get("index") in self.tools:
                pj = d.get("partial_json", "")
                if pj:
                    self.no_args.discard(event["index"])
                return [self.chunk({"tool_calls": [{"index": self.tools[event["index"]], "function": {"arguments": pj}}]})] if pj else []
            if dk == "signature_delta" and d.get("signature"):  # non-standard, lets the signature survive
                return [self.chunk({"reasoning_signature": d["signature"]})]
            return []
        if kind == "content_block_start":
            b = event.get("content_block") or {}
            if b.get("type") == "tool_use":
                ti = self.tool_count
                self.tool_count += 1
                self.tools[event.get("index", 0)] = ti
                self.no_args.add(event.get("index", 0))
                return [self.chunk({"tool_calls": [{"index": ti, "id": b.get("id"), "type": "function",
                                                    "function": {"name": b.get("name"), "arguments": ""}}]})]
            if b.get("type") == "text" and b.get("text"):
                return [self.chunk({"content": b["text"]})]
            return []
        if kind == "content_block_stop" and event.get("index") in self.no_args:
            # a call with no arguments: "{}", as the whole (non-streamed) reply gives, never ""
            self.no_args.discard(event["index"])
            return [self.chunk({"tool_calls": [{"index": self.tools[event["index"]], "function": {"arguments": "{}"}}]})]
        if kind == "message_start":
            msg = event.get("message") or {}
            self.usage = anth.usage_to_canonical(msg.get("usage"))
            return [self.chunk({"role": "assistant", "content": ""})]
        if kind == "message_delta":
            self.stop = (event.get("delta") or {}).get("stop_reason") or self.stop
            u = event.get("usage") or {}
            merged = {**anth.usage_from_canonical(self.usage), **{k: v for k, v in u.items() if v is not None}}
            self.usage = anth.usage_to_canonical(merged)
            return []
        if kind == "message_stop":
            reason = c.ANTHROPIC_STOP_TO_CANON.get(self.stop or "end_turn", "end")
            return self.final(c.final_stop(reason, self.tool_count > 0))
        if kind == "error":
            err = event.get("error") or {}
            etype = err.get("type")
            status = 529 if etype == "overloaded_error" else 502
            raise GatewayError(ErrorKind.OVERLOADED if status == 529 else ErrorKind.UPSTREAM_ERROR,
                               f"upstream sent an error mid-stream: {err.get('message')}", status=status,
                               upstream_type=etype if isinstance(etype, str) else None)
        return []  # ping and unknown future events


class GeminiToOpenAI(_OpenAIChunks):
    def __init__(self, model: str, include_usage: bool) -> None:
        super().__init__(model, include_usage)
        self.started = False
        self.reason: str | None = None

    def feed(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if not self.started:
            self.started = True
            out.append(self.chunk({"role": "assistant", "content": ""}))
        if "error" in obj:
            raise gem.error_from_body(obj, 502)
        if isinstance(obj.get("usageMetadata"), dict):
            self.usage = gem.usage_to_canonical(obj["usageMetadata"])
        block = (obj.get("promptFeedback") or {}).get("blockReason")
        if block:
            self.reason = "content_filter"
        for cand in obj.get("candidates") or ():
            if cand.get("index", 0) != 0:
                continue
            for part in (cand.get("content") or {}).get("parts") or ():
                if "functionCall" in part:
                    cid, name, args = gem.call_from_part(part["functionCall"] or {}, part)
                    out.append(self.chunk({"tool_calls": [{
                        "index": self.tool_count, "id": cid, "type": "function",
                        "function": {"name": name, "arguments": args}}]}))
                    self.tool_count += 1
                elif isinstance(part.get("text"), str) and part["text"]:
                    key = "reasoning_content" if part.get("thought") else "content"
                    out.append(self.chunk({key: part["text"]}))
            fr = cand.get("finishReason")
            if fr:
                self.reason = c.GEMINI_FINISH_TO_CANON.get(fr, "end")
        return out

    def end(self) -> list[dict[str, Any]]:
        out = [] if self.started else [self.chunk({"role": "assistant", "content": ""})]
        return out + self.final(c.final_stop(self.reason, self.tool_count > 0))


class OpenAIToGemini:
    """OpenAI chat chunks -> Gemini ``streamGenerateContent?alt=sse`` responses (dicts).

    Text and thoughts go out as they arrive; a function call goes out whole (Gemini sends each
    ``functionCall`` part complete) once its arguments are complete: when the next call starts, or
    at the end. The last response has the finish reason and the usage."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = gemini_in.new_response_id()
        self.calls: dict[int, list[str]] = {}  # OpenAI tool index -> [id, name, arguments so far]
        self.sent: set[int] = set()
        self.finish: str | None = None
        self.usage = c.Usage()

    def _response(self, parts: list[dict[str, Any]], finish: str | None = None) -> dict[str, Any]:
        cand: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
        if finish is not None:
            cand["finishReason"] = finish
        return {"candidates": [cand], "modelVersion": self.model, "responseId": self.id}

    def _flush_calls(self, upto: int | None = None) -> list[dict[str, Any]]:
        parts = []
        for ti in sorted(self.calls):
            if ti in self.sent or (upto is not None and ti >= upto):
                continue
            cid, name, args = self.calls[ti]
            parts.append(gemini_in.call_part(cid, name, args))
            self.sent.add(ti)
        return parts

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        usage, delta, reasoning, finish = read_chunk(chunk)
        if usage is not None:
            self.usage = usage
        if delta is None:
            return []
        parts: list[dict[str, Any]] = []
        if reasoning is not None:
            parts.append({"text": reasoning, "thought": True})
        text = delta.get("content")
        if isinstance(text, str) and text:
            parts.append({"text": text})
        for tc in delta.get("tool_calls") or ():
            ti = tc.get("index", 0)
            fn = tc.get("function") or {}
            if ti not in self.calls:
                parts += self._flush_calls(upto=ti)  # the calls before this one are complete
                self.calls[ti] = [tc.get("id") or gem.new_call_id(), fn.get("name") or "", ""]
            if isinstance(fn.get("arguments"), str):
                self.calls[ti][2] += fn["arguments"]
        if finish:
            self.finish = finish
        return [self._response(parts)] if parts else []

    def end(self) -> list[dict[str, Any]]:
        reason = c.final_stop(c.OPENAI_FINISH_TO_CANON.get(self.finish or "stop", "end"), bool(self.calls))
        last = self._response(self._flush_calls(), gemini_in.CANON_TO_FINISH.get(reason, "STOP"))
        last["usageMetadata"] = gemini_in.usage_from_canonical(self.usage)
        return [last]
