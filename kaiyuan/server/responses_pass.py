"""``/v1/responses`` passed through to an upstream that speaks the Responses API itself, held to
the output cap the gateway reserved and sent, as chat streams are (:mod:`kaiyuan.server.overrun`).

The request goes as the client sent it (model renamed, ``max_output_tokens`` set to the cap). The
reply is relayed as it arrives (its ``model`` the public name, as on every path); one output token is counted per non-empty ``*.delta`` event (a
lower bound: an upstream that honours the cap is never cut). An upstream that ignores the cap is
stopped there: the upstream request is closed, the open output items are ended (their text so far,
status ``incomplete``), and the stream ends with ``response.incomplete`` (``max_output_tokens``)
carrying the counted usage; a whole answer past the cap is cut to the cap's share of its text.
Either way the ledger gets the true usage (reported, or else counted) and the deployment is
flagged as not honouring ``max_tokens``.

Only structural events (a handful per answer) are parsed as they pass; the deltas of the items still
open are held as bytes and parsed only if the stream is cut.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from kaiyuan.accounting.output_cap import asked
from kaiyuan.context import RequestContext
from kaiyuan.dialects import responses_out as ro
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.gateway import Gateway
from kaiyuan.providers.base import Provider, UpstreamCall
from kaiyuan.redact import scrub_bytes
from kaiyuan.server import translate
from kaiyuan.server.common import JSON_CT, ModelRenamer, kaiyuan_headers, with_public_model
from kaiyuan.server.overrun import OutputLimit, close_upstream, output_limit, overran, record_cut
from kaiyuan.server.sse import MAX_CAPTURE, relay, upstream_error
from kaiyuan.server.sse_framer import sse_events

TERMINAL_TYPES = ("response.completed", "response.incomplete", "response.failed")
HEAD = 96  # bytes of an event that name its type (the event line, or the data's leading "type")


async def passthrough(request: web.Request, gw: Gateway, ctx: RequestContext, body: dict[str, Any],
                      stream: bool) -> web.StreamResponse:
    ask = asked(body, "responses")

    def build(provider: Provider) -> UpstreamCall:
        cap = ctx.output_cap = gw.caps.cap(provider.id, ask)  # reserved for it, sent, and enforced
        return UpstreamCall("responses", {**body, "model": provider.deployment.model, "max_output_tokens": cap}, stream)

    provider, reply = await gw.execute(ctx, build)
    lim = output_limit(ctx, gw.router.flag_overrun, provider.deployment.model)
    public = ctx.model or ""
    if reply.stream is not None:
        ctx.status = 200
        upstream = reply.stream
        return await relay(request, ctx, lambda resp: _pump(resp, ctx, upstream, lim), error_event, lim)
    data = reply.body or b""
    obj = translate.parsed_body(reply)
    if obj is not None:
        usage = ro.usage_to_canonical(obj.get("usage"))
        translate.usage_into_ctx(usage, ctx)
        if reply.status == 200 and overran(lim, usage.output_tokens, len(data)):
            assert lim is not None
            data = cut_body({**obj, "model": public} if "model" in obj else obj, lim, usage.output_tokens)
        else:
            data = with_public_model(obj, data, public)  # the public name on every path (docs/translation.md)
    ctx.status = reply.status
    ctx.mark_first_byte()
    if ctx.log_bodies or ctx.capture_response:
        ctx.response_body = data
    return web.Response(body=data, status=reply.status, content_type=JSON_CT, headers=kaiyuan_headers(ctx))


def error_event(err: GatewayError) -> bytes:
    """An ``error`` event for a pass-through stream that broke (the upstream's numbering is unknown)."""
    code = err.code if err.code is not None else err.kind.name.lower()
    nested = {"type": err.kind.value.openai_type, "code": code, "message": err.message, "param": err.param}
    return b"event: error\ndata: " + orjson.dumps({"type": "error", **nested, "error": nested}) + b"\n\n"


# -- a whole answer --------------------------------------------------------------------------------
def _cut(text: Any, frac: float) -> Any:
    return text[: math.floor(len(text) * frac)] if isinstance(text, str) else text


def cut_body(obj: dict[str, Any], lim: OutputLimit, reported: int) -> bytes:
    """A Responses object whose output ran past the limit: each text (message, reasoning) cut to the
    limit's share, status ``incomplete`` (``max_output_tokens``). Usage stays as reported (the bill)."""
    frac = lim.limit / reported
    for item in obj.get("output") or ():
        if not isinstance(item, dict):
            continue
        for key in ("content", "summary"):
            for part in item.get(key) or ():
                if isinstance(part, dict) and "text" in part:
                    part["text"] = _cut(part["text"], frac)
        if item.get("type") in ("message", "reasoning"):
            item["status"] = "incomplete"
    obj["status"] = "incomplete"
    obj["incomplete_details"] = {"reason": "max_output_tokens"}
    lim.overrun(reported)
    return orjson.dumps(obj)


# -- a stream --------------------------------------------------------------------------------------
def _data(ev: bytes) -> dict[str, Any] | None:
    for line in ev.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                obj = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                return None
            return obj if isinstance(obj, dict) else None
    return None


def delta_tokens(ev: bytes) -> int:
    """1 for a ``*.delta`` event that carries something (text, reasoning, tool arguments)."""
    head = ev[:HEAD]
    if head.find(b".delta") < 0:  # find, not `in` (docs/architecture.md, hot path)
        return 0
    return 0 if ev.find(b'"delta":""') >= 0 or ev.find(b'"delta": ""') >= 0 else 1


@dataclass(slots=True)
class PassState:
    """What a cut needs to end the stream well: the response as created, the output items (as added,
    then as done), the items still open and the delta events that filled them (as bytes)."""

    response: dict[str, Any] = field(default_factory=dict)
    items: dict[int, dict[str, Any]] = field(default_factory=dict)
    parts: dict[int, dict[int, dict[str, Any]]] = field(default_factory=dict)  # item -> content index -> part
    open: set[int] = field(default_factory=set)
    held: list[bytes] = field(default_factory=list)
    seq: int = -1  # the last sequence_number seen on a parsed event

    def structural(self, ev: bytes) -> dict[str, Any] | None:
        """Parse a non-delta event (returned). A delta found here (its type further in) is held."""
        obj = _data(ev)
        if obj is None:
            return None
        kind = str(obj.get("type") or "")
        if isinstance(obj.get("sequence_number"), int):
            self.seq = obj["sequence_number"]
        if kind.endswith(".delta"):
            self.held.append(ev)
        elif kind in ("response.created", "response.in_progress") and isinstance(obj.get("response"), dict):
            self.response = obj["response"]
        elif kind in ("response.output_item.added", "response.output_item.done") and isinstance(obj.get("item"), dict):
            i = _index(obj, "output_index")
            self.items[i] = obj["item"]
            if kind.endswith("added"):
                self.open.add(i)
            else:
                self.open.discard(i)
                if not self.open:
                    self.held.clear()
        elif kind == "response.content_part.added" and isinstance(obj.get("part"), dict):
            self.parts.setdefault(_index(obj, "output_index"), {})[_index(obj, "content_index")] = dict(obj["part"])
        return obj

    def close(self, usage: dict[str, Any]) -> list[dict[str, Any]]:
        """The events that end a cut stream: each open item done with what it holds, then
        ``response.incomplete``."""
        texts: dict[tuple[int, str, int], str] = {}
        for ev in self.held:
            obj = _data(ev)
            if obj is None:
                continue
            if isinstance(obj.get("sequence_number"), int):
                self.seq = max(self.seq, obj["sequence_number"])
            key = (_index(obj, "output_index"), str(obj.get("type")), _index(obj, "content_index", "summary_index"))
            texts[key] = texts.get(key, "") + str(obj.get("delta") or "")
        out: list[dict[str, Any]] = []
        for i in sorted(self.open):
            out.extend(self._end_item(i, texts))
        resp = {**self.response, "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"},
                "output": [self.items[i] for i in sorted(self.items)], "usage": usage}
        out.append({"type": "response.incomplete", "response": resp})
        return out

    def _end_item(self, i: int, texts: dict[tuple[int, str, int], str]) -> list[dict[str, Any]]:
        item = dict(self.items[i])
        item["status"] = "incomplete"
        iid = item.get("id")
        out: list[dict[str, Any]] = []
        kind = item.get("type")
        if kind == "message":
            parts = self.parts.get(i, {})
            for ci in sorted(parts):
                part = parts[ci]
                text = texts.get((i, "response.output_text.delta", ci), "")
                if part.get("type") == "refusal":
                    part["refusal"] = texts.get((i, "response.refusal.delta", ci), "")
                else:
                    part["text"] = text
                    out.append({"type": "response.output_text.done", "item_id": iid, "output_index": i,
                                "content_index": ci, "text": text, "logprobs": []})
                out.append({"type": "response.content_part.done", "item_id": iid, "output_index": i,
                            "content_index": ci, "part": part})
            item["content"] = [parts[ci] for ci in sorted(parts)]
        elif kind in ("function_call", "custom_tool_call"):
            field_name = "arguments" if kind == "function_call" else "input"
            delta = "response.function_call_arguments.delta" if kind == "function_call" else \
                "response.custom_tool_call_input.delta"
            item[field_name] = texts.get((i, delta, 0), "")
            if kind == "function_call":
                out.append({"type": "response.function_call_arguments.done", "item_id": iid, "output_index": i,
                            "arguments": item[field_name]})
        elif kind == "reasoning":
            summaries = sorted(k for k in texts if k[0] == i and k[1] == "response.reasoning_summary_text.delta")
            if summaries:
                item["summary"] = [{"type": "summary_text", "text": texts[k]} for k in summaries]
            contents = sorted(k for k in texts if k[0] == i and k[1] == "response.reasoning_text.delta")
            if contents:
                item["content"] = [{"type": "reasoning_text", "text": texts[k]} for k in contents]
        self.items[i] = item
        out.append({"type": "response.output_item.done", "output_index": i, "item": item})
        return out


def _index(obj: dict[str, Any], *keys: str) -> int:
    for k in keys:
        v = obj.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return 0


def _usage_dict(prompt: int, output: int) -> dict[str, Any]:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + output}


async def _pump(resp: web.StreamResponse, ctx: RequestContext, upstream: AsyncIterator[bytes],
                lim: OutputLimit | None) -> None:
    """Relay the upstream's events as they arrive; usage from its last one; cut at ``lim``. A stream
    that ends without a terminal event ends with an error, never a silent truncation."""
    st = PassState()
    rename = ModelRenamer(ctx.model or "")  # the response object's model: the public name
    tail = bytearray() if ctx.log_bodies or ctx.capture_response else None
    ended = failed = False
    try:
        async for events in sse_events(upstream):
            out: list[bytes] = []
            for ev in events:
                n = delta_tokens(ev)
                if n and lim is not None:
                    if lim.over(n):
                        await _cut_stream(resp, ctx, lim, st, b"".join(out), tail)
                        return
                    st.held.append(ev)
                elif not n:
                    ev = rename(ev)
                    obj = st.structural(ev)
                    kind = obj.get("type") if obj is not None else None
                    if kind in TERMINAL_TYPES:
                        ended = True
                        r = obj.get("response") if obj is not None else None
                        if isinstance(r, dict):
                            translate.usage_into_ctx(ro.usage_to_canonical(r.get("usage")), ctx)
                    elif kind == "error" and obj is not None:  # the upstream's own error: passed on, the only one
                        nested = obj.get("error")
                        upstream_error(ctx, obj.get("message") or (nested.get("message") if isinstance(nested, dict)
                                                                   else nested))
                        ev = scrub_bytes(ev)  # it may echo the vendor key
                        failed = True
                out.append(ev + b"\n\n")
                if failed:
                    break
            ctx.mark_first_byte()
            data = b"".join(out)
            if tail is not None and len(tail) < MAX_CAPTURE:
                tail.extend(data)
            await resp.write(data)
            if failed:
                return
    finally:
        if tail is not None:
            ctx.response_body = bytes(tail)
    if not ended:
        raise GatewayError(ErrorKind.UPSTREAM_ERROR, f"upstream {ctx.deployment} ended the stream early (no "
                           "response.completed); the answer is incomplete")


async def _cut_stream(resp: web.StreamResponse, ctx: RequestContext, lim: OutputLimit, st: PassState, pending: bytes,
               tail: bytearray | None) -> None:
    """End the stream at the cap: the upstream closed, the open items done, ``response.incomplete``."""
    await close_upstream(ctx)
    prompt, output = record_cut(ctx, lim, ctx.prompt_body())
    events = st.close(_usage_dict(prompt, output))
    data = pending + b"".join(f"event: {e['type']}\ndata: ".encode() + orjson.dumps({**e, "sequence_number": st.seq + 1 + k})
                              + b"\n\n" for k, e in enumerate(events))
    if tail is not None and len(tail) < MAX_CAPTURE:
        tail.extend(data)
    ctx.mark_first_byte()
    await resp.write(data)
