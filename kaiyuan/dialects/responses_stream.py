"""OpenAI chat chunks -> the Responses API's streaming events, with ``sequence_number``.

Every upstream stream is first read as OpenAI chat chunks (``kaiyuan.server.translate`` turns
Anthropic and Gemini streams into those), so one state machine serves every protocol. It emits:

``response.created``, ``response.in_progress``; per item ``response.output_item.added`` ... ``.done``;
for text ``content_part.added``, ``output_text.delta``, ``output_text.done``, ``content_part.done``;
for tool calls ``function_call_arguments.delta`` / ``.done``; for reasoning either
``reasoning_summary_part.added``, ``reasoning_summary_text.delta`` / ``.done``,
``reasoning_summary_part.done`` (when ``reasoning.summary`` was asked) or ``reasoning_text.delta`` /
``.done``; and last ``response.completed`` or ``response.incomplete`` (or ``error`` followed by
``response.failed``). Opening a new kind of item closes the others, so items never interleave,
except parallel tool calls, whose arguments may.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from kaiyuan.dialects import canonical as c
from kaiyuan.dialects import responses_out as ro
from kaiyuan.dialects.openai_chat import read_chunk
from kaiyuan.errors import GatewayError


@dataclass(slots=True)
class _Item:
    kind: str  # "reasoning" | "message" | "call"
    id: str
    index: int
    text: str = ""
    signature: str | None = None
    call_id: str = ""
    name: str = ""


def sse(obj: dict[str, Any]) -> bytes:
    return b"event: " + obj["type"].encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


class ChatToResponses:
    def __init__(self, skeleton: dict[str, Any], shape: ro.Shape) -> None:
        self.r = skeleton
        self.shape = shape
        self.seq = 0
        self.output: dict[int, dict[str, Any]] = {}  # output_index -> finished item
        self.thinking: dict[int, c.Thinking] = {}  # output_index -> a reasoning item's text and signature
        self.open: dict[int, _Item] = {}
        self.tools: dict[int, _Item] = {}  # chat tool_calls index -> its item
        self.next_index = 0
        self.finish: str | None = None
        self.usage = c.Usage()
        self.had_tools = False
        self.final: dict[str, Any] | None = None

    def _ev(self, kind: str, **fields: Any) -> bytes:
        obj = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return sse(obj)

    def start(self) -> list[bytes]:
        return [self._ev("response.created", response=self.r), self._ev("response.in_progress", response=self.r)]

    # -- items ------------------------------------------------------------------------------
    def _open(self, kind: str, prefix: str, **extra: Any) -> tuple[_Item, list[bytes]]:
        out: list[bytes] = []
        for it in list(self.open.values()):
            if kind != "call" or it.kind != "call":
                out += self._close(it)
        item = _Item(kind, ro.new_id(prefix), self.next_index, **extra)
        self.next_index += 1
        self.open[item.index] = item
        return item, out

    def _current(self, kind: str) -> _Item | None:
        return next((it for it in self.open.values() if it.kind == kind), None)

    def _reasoning(self, text: str) -> list[bytes]:
        item = self._current("reasoning")
        out: list[bytes] = []
        if item is None:
            item, out = self._open("reasoning", "rs")
            added: dict[str, Any] = {"type": "reasoning", "id": item.id, "summary": []}
            out.append(self._ev("response.output_item.added", output_index=item.index, item=added))
            if self.shape.summary:
                out.append(self._ev("response.reasoning_summary_part.added", item_id=item.id, output_index=item.index,
                                    summary_index=0, part={"type": "summary_text", "text": ""}))
        item.text += text
        if self.shape.summary:
            out.append(self._ev("response.reasoning_summary_text.delta", item_id=item.id, output_index=item.index,
                                summary_index=0, delta=text))
        else:
            out.append(self._ev("response.reasoning_text.delta", item_id=item.id, output_index=item.index,
                                content_index=0, delta=text))
        return out

    def _text(self, text: str) -> list[bytes]:
        item = self._current("message")
        out: list[bytes] = []
        if item is None:
            item, out = self._open("message", "msg")
            added = {"type": "message", "id": item.id, "status": "in_progress", "role": "assistant", "content": []}
            out.append(self._ev("response.output_item.added", output_index=item.index, item=added))
            out.append(self._ev("response.content_part.added", item_id=item.id, output_index=item.index, content_index=0,
                                part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}))
        item.text += text
        out.append(self._ev("response.output_text.delta", item_id=item.id, output_index=item.index, content_index=0,
                            delta=text, logprobs=[]))
        return out

    def _tool(self, tc: dict[str, Any]) -> list[bytes]:
        ti = tc.get("index", 0)
        fn = tc.get("function") or {}
        out: list[bytes] = []
        item = self.tools.get(ti)
        if item is None:
            self.had_tools = True
            item, out = self._open("call", "fc", call_id=tc.get("id") or ro.new_id("call"), name=fn.get("name") or "")
            self.tools[ti] = item
            added = ro.call_item(item.id, c.ToolCall(item.call_id, item.name, ""), self.shape, "in_progress")
            out.append(self._ev("response.output_item.added", output_index=item.index, item=added))
        args = fn.get("arguments")
        if isinstance(args, str) and args and item.index in self.open:
            item.text += args
            if self.shape.names.original(item.name)[2] == "function":
                out.append(self._ev("response.function_call_arguments.delta", item_id=item.id, output_index=item.index,
                                    delta=args))
        return out

    def _close(self, item: _Item) -> list[bytes]:
        del self.open[item.index]
        out: list[bytes] = []
        ix = {"item_id": item.id, "output_index": item.index}
        if item.kind == "reasoning":
            if self.shape.summary:
                part = {"type": "summary_text", "text": item.text}
                out.append(self._ev("response.reasoning_summary_text.done", **ix, summary_index=0, text=item.text))
                out.append(self._ev("response.reasoning_summary_part.done", **ix, summary_index=0, part=part))
            else:
                out.append(self._ev("response.reasoning_text.done", **ix, content_index=0, text=item.text))
            self.thinking[item.index] = c.Thinking(item.text, signature=item.signature)
            done = ro.reasoning_item(item.id, self.thinking[item.index], self.shape)
        elif item.kind == "message":
            done = ro.message_item(item.id, item.text)
            out.append(self._ev("response.output_text.done", **ix, content_index=0, text=item.text, logprobs=[]))
            out.append(self._ev("response.content_part.done", **ix, content_index=0, part=done["content"][0]))
        else:
            call = c.ToolCall(item.call_id, item.name, item.text or "{}")
            done = ro.call_item(item.id, call, self.shape)
            if done["type"] == "function_call":
                out.append(self._ev("response.function_call_arguments.done", **ix, arguments=call.arguments,
                                    name=done["name"]))
        self.output[item.index] = done
        out.append(self._ev("response.output_item.done", output_index=item.index, item=done))
        return out

    # -- the stream -------------------------------------------------------------------------
    def feed(self, chunk: dict[str, Any]) -> list[bytes]:
        usage, delta, reasoning, finish = read_chunk(chunk)
        if usage is not None:
            self.usage = usage
        if delta is None:
            return []
        out: list[bytes] = []
        if reasoning is not None:
            out += self._reasoning(reasoning)
        sig = delta.get("reasoning_signature")
        if isinstance(sig, str) and sig:
            item = self._current("reasoning")
            if item is not None:
                item.signature = (item.signature or "") + sig
        text = delta.get("content")
        if isinstance(text, str) and text:
            out += self._text(text)
        for tc in delta.get("tool_calls") or ():
            out += self._tool(tc)
        if finish:
            self.finish = finish
        return out

    def end(self) -> list[bytes]:
        """After the upstream's end: close the items, then ``response.completed`` / ``.incomplete``."""
        out: list[bytes] = []
        for it in sorted(self.open.values(), key=lambda x: x.index):
            out += self._close(it)
        reason = c.final_stop(c.OPENAI_FINISH_TO_CANON.get(self.finish or "stop", "end"), self.had_tools)
        self.final = ro.finished(self.r, [self.output[i] for i in sorted(self.output)], reason, self.usage)
        kind = "response.completed" if self.final["status"] == "completed" else "response.incomplete"
        out.append(self._ev(kind, response=self.final))
        return out

    def failed(self, err: GatewayError) -> bytes:
        """The last events of a stream that broke: ``error``, then ``response.failed``."""
        code = err.code if err.code is not None else err.kind.name.lower()
        # The spec's flat fields, and the nested "error" object on which the OpenAI SDKs raise.
        nested = {"type": err.upstream_type or err.kind.value.openai_type, "code": code, "message": err.message,
                  "param": err.param}
        error = self._ev("error", code=code, message=err.message, param=err.param, error=nested)
        output = [self.output[i] for i in sorted(self.output)]
        failed = {**self.r, "status": "failed", "output": output, "error": {"code": "server_error" if err.status >= 500
                                                                            else code, "message": err.message}}
        return error + self._ev("response.failed", response=failed)
