"""The OpenAI pass-through stream relay (kaiyuan.server.sse) gives the client the same bytes however
the upstream's stream is cut into reads: one event per read (a slow stream), many events per read
(a busy gateway reads what has piled up), or reads that split events and their terminators
anywhere. Events before a usage or error event are edited together (null usages dropped, model
names rewritten); this checks that doing so changes nothing the client sees."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest

from kaiyuan.context import RequestContext
from kaiyuan.server import sse
from kaiyuan.server.common import ModelRenamer
from kaiyuan.server.overrun import OutputLimit


class _Client:
    """What the relay writes to: the client's response (the relay's HTTP side is tested end to end
    in test_openai_passthrough.py; this pins the event editing)."""

    prepared = True

    def __init__(self) -> None:
        self.data = bytearray()
        self.ended = False

    async def write(self, data: bytes) -> None:
        assert not self.ended
        self.data += data

    async def write_eof(self, data: bytes = b"") -> None:
        self.data += data
        self.ended = True


def _ev(obj: dict[str, Any], space: bool = False) -> bytes:
    data = orjson.dumps(obj)
    return b"data: " + (data.replace(b'"usage":null', b'"usage": null') if space else data) + b"\n\n"


def _stream(usage_forms: bool = True, error: bool = False) -> bytes:
    base = {"id": "c1", "object": "chat.completion.chunk", "model": "up-model"}
    evs = [_ev({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "usage": None})]
    for i in range(6):
        ch = {"index": 0, "delta": {"content": f"t{i} \"model\":\"up-model\" "}, "finish_reason": None}
        if usage_forms and i % 2:
            evs.append(_ev({"usage": None, **base, "choices": [ch]}, space=i == 3))  # "usage" first, other spacing
        else:
            evs.append(_ev({**base, "choices": [ch], "usage": None}))
    if error:
        evs.append(_ev({"error": {"message": "overloaded", "type": "server_error"}}))
    evs.append(_ev({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None}))
    evs.append(_ev({**base, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15}}))
    return b"".join(evs) + b"data: [DONE]\n\n" + b"data: {\"after\": \"done\"}\n\n"


def _cuts(raw: bytes, seed: int) -> Iterator[list[bytes]]:
    events = [e + b"\n\n" for e in raw.split(b"\n\n") if e]
    yield events  # one event per read
    yield [raw]  # everything in one read
    yield [b"".join(events[i:i + 3]) for i in range(0, len(events), 3)]  # a few events per read
    mids = [k + 1 for k in range(len(raw) - 1) if raw[k:k + 2] == b"\n\n"]  # inside every terminator
    for points in (mids, mids[::2], [k + 1 for k in mids]):  # ... and one byte on
        yield [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    rnd = random.Random(seed)
    for _ in range(20):  # reads cut anywhere, also inside "\n\n"
        points = sorted(rnd.sample(range(1, len(raw)), rnd.randint(1, 30)))
        yield [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]


async def _relay(reads: list[bytes], strip_usage: bool, cap: int | None,
                 source: AsyncIterator[bytes] | None = None) -> tuple[bytes, RequestContext]:
    """The relay fed ``reads`` by a generator (or by ``source``, which reads the same bytes)."""
    async def upstream() -> AsyncIterator[bytes]:
        for r in reads:
            yield r

    ctx = RequestContext("req_test", "openai", "chat")
    ctx.deployment = "dep"
    lim = OutputLimit(cap, 1, lambda *a: None, "dep", "up-model") if cap is not None else None
    client = _Client()

    async def opened(request: Any, c: RequestContext, head_with_first_events: bool = False) -> _Client:
        return client

    real = sse.open_stream
    sse.open_stream = opened  # type: ignore[assignment]
    try:
        await sse.relay_openai_stream(None, ctx, source or upstream(), strip_usage, lim, ModelRenamer("public"))  # type: ignore[arg-type]
    finally:
        sse.open_stream = real  # type: ignore[assignment]
    assert client.ended
    return bytes(client.data), ctx


@pytest.mark.parametrize("strip_usage", [True, False])
@pytest.mark.parametrize("cap", [None, 100, 3])
@pytest.mark.parametrize("error", [False, True])
def test_the_client_gets_the_same_bytes_however_the_stream_is_read(strip_usage: bool, cap: int | None,
                                                                    error: bool) -> None:
    raw = _stream(error=error)
    results = [asyncio.run(_relay(reads, strip_usage, cap)) for reads in _cuts(raw, seed=7)]
    first, ctx0 = results[0]
    for out, ctx in results[1:]:
        assert out == first
        assert (ctx.usage, ctx.status, ctx.error) == (ctx0.usage, ctx0.status, ctx0.error)
    assert first.endswith(b"data: [DONE]\n\n") and b"after" not in first
    assert b"up-model\"," not in first and first.count(b'"model":"public"') == first.count(b"chat.completion.chunk")
    assert b'\\"model\\":\\"up-model\\"' in first  # a model name inside the generated text is the text's
    if strip_usage:
        assert b'"usage"' not in first  # the caller did not ask for usage: none of it, null or not
    else:
        assert first.count(b'"usage":null') + first.count(b'"usage": null') == (4 if cap == 3 else 8)  # role, contents, finish
    if cap == 3:  # cut at the limit: three tokens, then the gateway's own finish
        assert first.count(b"delta\":{\"content\":\"t") == 3 and b'"finish_reason":"length"' in first
    elif error:
        assert ctx0.status == 502 and "overloaded" in (ctx0.error or "")
    else:
        assert ctx0.usage.prompt_tokens == 9 and ctx0.usage.completion_tokens == 6


def test_empty_events_and_crlf_framing_read_alike() -> None:
    raw = _stream()
    crlf = raw.replace(b"\n", b"\r\n")
    padded = raw.replace(b"\n\n", b"\n\n\n\n", 3)  # empty events between real ones
    outs = {asyncio.run(_relay(reads, True, None))[0] for src in (raw, crlf, padded) for reads in _cuts(src, seed=3)}
    assert len(outs) == 1


@pytest.mark.parametrize("body", [
    {"id": "x", "model": "up", "choices": [{"message": {"content": 'say "model":"up" twice: "model":"up"'}}]},
    {"model": "up", "choices": [{"message": {"tool_calls": [{"function": {"arguments": '{"model":"up"}'}}]}}],
     "usage": {"prompt_tokens": 1}},
    {"choices": [], "meta": {"model": "up"}, "model": "up"},  # the same name nested: re-serialised
    {"model": "üp", "x": "naïve"},
])
@pytest.mark.parametrize("spaced", [False, True])
def test_a_whole_reply_gets_the_public_model_name_and_nothing_else_changes(body: dict[str, Any], spaced: bool) -> None:
    from kaiyuan.server.common import with_public_model

    data = orjson.dumps(body)
    if spaced:
        data = data.replace(b'":', b'": ')  # as a pretty-printing upstream spells it (strings too: harmless)
    obj = orjson.loads(data)
    out = with_public_model(obj, data, "public")
    assert orjson.loads(out) == {**obj, "model": "public"}
    assert with_public_model(obj, data, obj["model"]) is data  # same name: the bytes untouched


def test_a_nested_model_field_is_not_taken_for_the_top_level_one() -> None:
    from kaiyuan.server.common import with_public_model

    data = b'{"model": "up", "meta": {"model":"up"}}'  # the top level spaced, the nested one compact
    out = with_public_model(orjson.loads(data), data, "public")
    assert orjson.loads(out) == {"model": "public", "meta": {"model": "up"}}


def test_notable_finds_what_the_regex_finds_on_one_event_or_many() -> None:
    import re

    from kaiyuan.server.sse import notable

    regex = re.compile(rb'"usage": ?\{|"error"')
    parts = [b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}', b'data: {"usage": null,"a":1}',
             b'data: {"choices":[],"usage":{"prompt_tokens":1}}', b'data: {"choices":[],"usage": {"x":1}}',
             b'data: {"error":{"message":"m"}}', b'data: {"choices":[{"delta":{"content":"\\"usage\\":{"}}]}']
    rnd = random.Random(5)
    for _ in range(300):
        data = b"\n\n".join(rnd.choice(parts) for _ in range(rnd.randint(1, 40))) + b"\n\n"
        m = regex.search(data)
        assert notable(data) == notable(data, data.find(b'"usage":')) == (-1 if m is None else m.start())


def test_first_stop_agrees_with_the_event_by_event_walk() -> None:
    """The grouped counting of first_stop gives the same stop and the same count as testing every
    event in turn, across [DONE] forms, comments, non-SSE lines, and limits hit inside a group."""
    from kaiyuan.server.overrun import OutputLimit, openai_event_tokens
    from kaiyuan.server.sse import DONE_FORMS, SSE_FIELDS, first_stop

    def walk(events: list[bytes], lim: OutputLimit | None) -> int:
        for i, ev in enumerate(events):
            if ev.startswith(DONE_FORMS) or not ev.startswith(SSE_FIELDS):
                return i
            if lim is not None and lim.over(openai_event_tokens(ev)):
                return i
        return len(events)

    parts = [b'data: {"choices":[{"delta":{"content":"x"}}]}', b'data: {"choices":[{"delta":{"role":"assistant"}}]}',
             b'data: {"choices":[{"delta":{}}]}', b'data: {"choices":[],"usage":{"prompt_tokens":1}}',
             b'data:{"choices":[{"delta":{"content":"y"}}]}', b": keep-alive", b"event: x\ndata: {}",
             b"data: [DONE]", b"data:[DONE]", b"<html>oops", b'data: {"choices":[{"delta":{"content":""}}]}']
    rnd = random.Random(7)
    stops = set()
    for _ in range(2000):
        events = [rnd.choice(parts) for _ in range(rnd.randint(1, 12))]
        if rnd.random() < 0.5:
            events.append(b"data: [DONE]")
        cap = rnd.choice([None, 1, 3, 8, 100])
        seen = rnd.randint(0, 4)
        mine = None if cap is None else OutputLimit(cap, 1, lambda *a: None, "d", "m", seen)
        ref = None if cap is None else OutputLimit(cap, 1, lambda *a: None, "d", "m", seen)
        got = first_stop(events, mine)
        assert got == walk(events, ref), events
        assert (mine.seen if mine else None) == (ref.seen if ref else None), events
        stops.add(got == len(events))
    assert stops == {True, False}  # both outcomes were exercised


@pytest.mark.parametrize(("event", "tokens"), [
    (b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}', 1),
    (b'data: {"choices":[{"index":0,"delta":{"content":"\\"quoted\\""}}]}', 1),
    (b'data: {"choices":[{"index":0,"delta":{"content":""}}]}', 0),
    (b'data: {"choices":[{"index":0,"delta":{"content":"","reasoning_content":"hm"}}]}', 1),
    (b'data: {"choices":[{"index":0,"delta":{"content":null,"tool_calls":[{"index":0}]}}]}', 1),
    (b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}', 0),
    (b'data: {"choices":[{"index":0,"delta": { "content": "spaced"}}]}', 1),
    (b'data: {"choices":[{"index":0,"delta":{}, "finish_reason":"stop"}]}', 0),
    (b'data: {"choices":[],"usage":{"prompt_tokens":1}}', 0),
    (b'data: {"choices":[{"text":"legacy"}]}', 1),
    (b'data: {"choices":[{"text":""}]}', 0),
])
def test_openai_event_tokens(event: bytes, tokens: int) -> None:
    from kaiyuan.server.overrun import openai_event_tokens

    assert openai_event_tokens(event) == tokens


def _plain_stream(error: bool) -> bytes:
    """A stream as most upstreams send it when usage was asked for once: no ``"usage"`` field but
    on the last chunk, so nearly every read is one plain event (the relay's shortcut)."""
    raw = _stream(usage_forms=False, error=error)
    return raw.replace(b',"usage":null', b"")


@pytest.mark.parametrize("strip_usage", [True, False])
@pytest.mark.parametrize("cap", [None, 100, 3])
@pytest.mark.parametrize("error", [False, True])
def test_the_one_event_shortcut_writes_what_the_general_path_writes(strip_usage: bool, cap: int | None, error: bool,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _plain_stream(error)
    assert raw.count(b'"usage"') == 1
    cuts = list(_cuts(raw, seed=13))
    taken = []
    real = sse.one_plain_event
    monkeypatch.setattr(sse, "one_plain_event", lambda chunk: taken.append(real(chunk)) or taken[-1])
    fast = [asyncio.run(_relay(reads, strip_usage, cap)) for reads in cuts]
    assert sum(taken) >= 3  # the shortcut was taken (one event a read)
    monkeypatch.setattr(sse, "one_plain_event", lambda chunk: False)  # every read through the general path
    slow = [asyncio.run(_relay(reads, strip_usage, cap)) for reads in cuts]
    for (out, ctx), (want, ctx0) in zip(fast, slow, strict=True):
        assert out == want
        assert (ctx.usage, ctx.status, ctx.error) == (ctx0.usage, ctx0.status, ctx0.error)
    out, ctx = fast[0]  # one event a read
    assert out.count(b'"model":"public"') == out.count(b"chat.completion.chunk") and b'"up-model"' not in out
    if cap == 3:
        assert out.count(b"delta\":{\"content\":\"t") == 3 and b'"finish_reason":"length"' in out


def test_one_plain_event() -> None:
    ev = b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
    assert sse.one_plain_event(ev)
    for other in (ev + ev, ev[:-1], ev + b"\n", ev.replace(b"\n", b"\r\n"), b"data: [DONE]\n\n", b": ping\n\n",
                  ev.replace(b"]}", b'],"usage":null}'), b'data: {"error":{"message":"m"}}\n\n',
                  ev.replace(b'"choices"', b'"usage":{"a":1},"choices"'), b"event: x\n" + ev):
        assert not sse.one_plain_event(other), other
