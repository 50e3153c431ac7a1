"""Upstream replies that are odd or broken on the wire: each gives the client the right answer or a
clear error in its dialect, never a 500 with a traceback or a hang.

A raw upstream on 127.0.0.1 answers exactly the bytes (and chunking) a test scripts.
"""

from __future__ import annotations

import asyncio
import gzip
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from kaiyuan.providers import http as http_provider
from kaiyuan.server.sse_framer import sse_events
from kaiyuan.testing.harness import RunningGateway
from kaiyuan.testing.server_thread import ServerThread
from tests.conftest import openai_model

MSG = [{"role": "user", "content": "hello"}]


@dataclass
class Reply:
    status: int = 200
    chunks: list[bytes] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    stream: bool = False  # chunked, one write per chunk


class RawUpstream:
    def __init__(self) -> None:
        self.script: deque[Reply] = deque()
        self.default = Reply(500, [b'{"error": {"message": "nothing scripted"}}'])
        self.app = web.Application()
        self.app.router.add_route("POST", "/{tail:.*}", self.handle)
        self.url = ""
        self.peers: list[Any] = []  # the gateway's side of each request's connection

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        r = self.script.popleft() if self.script else self.default
        headers = {"Content-Type": "text/event-stream" if r.stream else "application/json", **r.headers}
        if not r.stream:
            return web.Response(status=r.status, body=b"".join(r.chunks), headers=headers)
        resp = web.StreamResponse(status=r.status, headers=headers)
        await resp.prepare(request)
        for ch in r.chunks:
            await resp.write(ch)
            await asyncio.sleep(0.001)  # separate reads on the gateway's side
        await resp.write_eof()
        return resp


@pytest.fixture
def raw(servers: ServerThread) -> Iterator[RawUpstream]:
    up = RawUpstream()
    up.url = servers.serve(up.app)
    yield up
    servers.stop(up.app)


@pytest.fixture
def gw(make_gateway: Callable[[dict[str, Any]], RunningGateway], raw: RawUpstream) -> RunningGateway:
    one = {"retries": {"max_attempts": 1}}
    return make_gateway({"models": [
        openai_model("m", raw.url, "up", routing=one),
        {"name": "claude", "routing": one, "deployments": [
            {"provider": "anthropic", "base_url": raw.url, "model": "claude-up", "api_key": "k"}]},
    ]})


def oai(g: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=g.base_url, api_key="x", max_retries=0, timeout=20)


def anth(g: RunningGateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=g.url, api_key="x", max_retries=0, timeout=20)


def chunk(content: str | None = None, usage: dict[str, int] | None = None, finish: str | None = None) -> bytes:
    obj: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "up",
                           "choices": [] if content is None and finish is None else
                           [{"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish}]}
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + orjson.dumps(obj) + b"\n\n"


USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
GOOD_STREAM = chunk("Hel") + chunk("lo") + chunk(finish="stop") + chunk(usage=USAGE) + b"data: [DONE]\n\n"
COMPLETION = {"id": "c1", "object": "chat.completion", "created": 1, "model": "up",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
              "usage": USAGE}


def _text(stream: Any) -> str:
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


# -- SSE framing --------------------------------------------------------------------------------------
async def _bytes(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def _events(data: bytes, size: int) -> list[bytes]:
    return [ev async for evs in sse_events(_bytes(data, size)) for ev in evs]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_sse_framing_survives_any_split_and_crlf(size: int) -> None:
    lf = b": keep-alive\n\nevent: x\ndata: {\"a\":1}\n\ndata: [DONE]\n\n"
    crlf = lf.replace(b"\n", b"\r\n")
    want = [b": keep-alive", b"event: x\ndata: {\"a\":1}", b"data: [DONE]"]
    assert asyncio.run(_events(lf, size)) == want
    assert asyncio.run(_events(crlf, size)) == want


def test_crlf_stream_split_at_every_byte(gw: RunningGateway, raw: RawUpstream) -> None:
    data = (b": keep-alive\n\n" + GOOD_STREAM).replace(b"\n", b"\r\n")
    raw.script.append(Reply(chunks=[data[i:i + 1] for i in range(len(data))], stream=True))
    stream = oai(gw).chat.completions.create(model="m", messages=MSG, stream=True,  # type: ignore[call-overload]
                                             stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 5
    row = gw.log_rows()[-1]
    assert row["status"] == 200 and row["prompt_tokens"] == 3 and row["completion_tokens"] == 2


def test_event_lines_and_comments_pass_through(gw: RunningGateway, raw: RawUpstream) -> None:
    data = b": ping\n\nevent: message\n" + GOOD_STREAM
    raw.script.append(Reply(chunks=[data], stream=True))
    assert _text(oai(gw).chat.completions.create(model="m", messages=MSG, stream=True)) == "Hello"


# -- whole bodies that are not what they claim ----------------------------------------------------------
@pytest.mark.parametrize("body", [b"<html>502 Bad Gateway</html>", b"[1, 2]", b"", b'"just a string"'])
def test_non_json_or_non_object_200_is_a_clear_502(gw: RunningGateway, raw: RawUpstream, body: bytes) -> None:
    raw.script.append(Reply(chunks=[body]))
    with pytest.raises(openai.APIStatusError) as e:
        oai(gw).chat.completions.create(model="m", messages=MSG)
    assert e.value.status_code == 502
    assert "upstream" in e.value.message
    assert gw.log_rows()[-1]["status"] == 502


def test_200_with_an_error_object_is_an_error(gw: RunningGateway, raw: RawUpstream) -> None:
    raw.script.append(Reply(chunks=[b'{"error": {"message": "model overloaded, try later", "code": 1234}}']))
    with pytest.raises(openai.APIStatusError) as e:
        oai(gw).chat.completions.create(model="m", messages=MSG)
    assert e.value.status_code == 502
    assert "model overloaded, try later" in e.value.message


def test_gzip_bodies_are_decoded(gw: RunningGateway, raw: RawUpstream) -> None:
    raw.script.append(Reply(chunks=[gzip.compress(orjson.dumps(COMPLETION))], headers={"Content-Encoding": "gzip"}))
    r = oai(gw).chat.completions.create(model="m", messages=MSG)
    assert r.choices[0].message.content == "Hello" and r.usage is not None and r.usage.total_tokens == 5
    z = zlib.compressobj(wbits=31)
    parts = [z.compress(GOOD_STREAM[i:i + 40]) + z.flush(zlib.Z_SYNC_FLUSH) for i in range(0, len(GOOD_STREAM), 40)]
    parts.append(z.flush())
    raw.script.append(Reply(chunks=parts, headers={"Content-Encoding": "gzip"}, stream=True))
    assert _text(oai(gw).chat.completions.create(model="m", messages=MSG, stream=True)) == "Hello"


def test_bad_gzip_is_a_clear_502(gw: RunningGateway, raw: RawUpstream) -> None:
    raw.script.append(Reply(chunks=[b"this is not gzip"], headers={"Content-Encoding": "gzip"}))
    with pytest.raises(openai.APIStatusError) as e:
        oai(gw).chat.completions.create(model="m", messages=MSG)
    assert e.value.status_code == 502


# -- streams -----------------------------------------------------------------------------------------
def test_stream_without_usage_still_answers(gw: RunningGateway, raw: RawUpstream) -> None:
    raw.script.append(Reply(chunks=[chunk("Hi"), chunk(finish="stop"), b"data: [DONE]\n\n"], stream=True))
    assert _text(oai(gw).chat.completions.create(model="m", messages=MSG, stream=True)) == "Hi"
    row = gw.log_rows()[-1]
    assert row["status"] == 200 and row["prompt_tokens"] is None


def test_huge_single_event_is_relayed(gw: RunningGateway, raw: RawUpstream) -> None:
    big = "x" * 3_000_000
    data = chunk(big) + chunk(finish="stop") + b"data: [DONE]\n\n"
    raw.script.append(Reply(chunks=[data[i:i + 65536] for i in range(0, len(data), 65536)], stream=True))
    assert _text(oai(gw).chat.completions.create(model="m", messages=MSG, stream=True)) == big


def test_garbage_lines_in_a_translated_stream_end_it_with_an_error(gw: RunningGateway, raw: RawUpstream) -> None:
    # An Anthropic upstream to an OpenAI caller: a data line that is not JSON is an error event, not a 500.
    start = b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","type":"message","role":"assistant","content":[],"model":"c","usage":{"input_tokens":3,"output_tokens":0}}}\n\n'
    raw.script.append(Reply(chunks=[start, b"event: content_block_delta\ndata: {not json\n\n"], stream=True))
    with pytest.raises(openai.APIError) as e:
        list(oai(gw).chat.completions.create(model="claude", messages=MSG, stream=True))
    assert "not JSON" in str(e.value)
    assert gw.log_rows()[-1]["status"] == 502


ANTH_START = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message",'
              b'"role":"assistant","content":[],"model":"claude-up","stop_reason":null,"stop_sequence":null,'
              b'"usage":{"input_tokens":7,"output_tokens":1}}}\n\n')
ANTH_REST = (b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
             b'event: ping\ndata: {"type": "ping"}\n\n'
             b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}\n\n'
             b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
             b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":5}}\n\n'
             b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


def test_anthropic_passthrough_stream_split_at_every_byte_with_crlf(gw: RunningGateway, raw: RawUpstream) -> None:
    data = (ANTH_START + ANTH_REST).replace(b"\n", b"\r\n")
    raw.script.append(Reply(chunks=[data[i:i + 1] for i in range(len(data))], stream=True))
    with anth(gw).messages.stream(model="claude", max_tokens=10, messages=MSG) as s:  # type: ignore[arg-type]
        msg = s.get_final_message()
    assert msg.content[0].text == "Hi"  # type: ignore[union-attr]
    row = gw.log_rows()[-1]
    assert row["status"] == 200 and row["prompt_tokens"] == 7 and row["completion_tokens"] == 5


@pytest.mark.parametrize("bad", [
    b"event: message_delta\ndata: {not json\n\n",
    b'event: message_delta\ndata: [1, 2]\n\n',
    b'event: message_start\ndata: {"type":"message_start","message":"oops"}\n\n',
    b'event: message_delta\ndata: {"type":"message_delta","usage":[1]}\n\n',
])
def test_anthropic_passthrough_garbage_ends_with_an_error_event(gw: RunningGateway, raw: RawUpstream, bad: bytes) -> None:
    raw.script.append(Reply(chunks=[ANTH_START, bad, ANTH_REST], stream=True))
    with pytest.raises(anthropic.APIError) as e:
        with anth(gw).messages.stream(model="claude", max_tokens=10, messages=MSG) as s:  # type: ignore[arg-type]
            s.get_final_message()
    assert "internal gateway error" not in str(e.value)
    assert gw.log_rows()[-1]["status"] == 502


# -- accounting of absurd usage -------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", [2**64 - 1, -5])
def test_absurd_usage_numbers_do_not_lose_log_rows(gw: RunningGateway, raw: RawUpstream, tokens: int) -> None:
    bad = {**COMPLETION, "usage": {"prompt_tokens": tokens, "completion_tokens": 2, "total_tokens": 5}}
    raw.script.append(Reply(chunks=[orjson.dumps(bad)]))
    raw.script.append(Reply(chunks=[orjson.dumps(COMPLETION)]))
    assert oai(gw).chat.completions.create(model="m", messages=MSG).choices[0].message.content == "Hello"
    assert oai(gw).chat.completions.create(model="m", messages=MSG).choices[0].message.content == "Hello"
    rows = gw.log_rows()
    assert len(rows) == 2 and gw.gateway.request_log.pending == 0
    # clamped (a prompt cannot hold more tokens than its request has bytes) or, when unusable
    # (negative), counted by the gateway: never unknown, never absurd
    assert 0 < rows[0]["prompt_tokens"] <= len(orjson.dumps({"model": "m", "messages": MSG})) + 20
    assert rows[0]["completion_tokens"] == 2
    assert rows[1]["prompt_tokens"] == 3


def test_made_up_model_names_do_not_grow_the_metrics(gw: RunningGateway) -> None:
    for i in range(30):
        with pytest.raises(openai.NotFoundError):
            oai(gw).chat.completions.create(model=f"no-such-model-{i}", messages=MSG)
    text = gw.gateway.metrics.render().decode()
    assert "no-such-model" not in text
    assert 'model="(unknown)"' in text


@pytest.mark.parametrize("encoding", ["br", "deflate", "x-made-up"])
@pytest.mark.parametrize("stream", [False, True])
def test_unexpected_content_encoding_is_a_clear_answer(gw: RunningGateway, raw: RawUpstream, encoding: str,
                                                       stream: bool) -> None:
    raw.script.append(Reply(chunks=[b"\x8b\x00garbage" * 3], headers={"Content-Encoding": encoding}, stream=stream))
    try:
        r = oai(gw).chat.completions.create(model="m", messages=MSG, stream=stream)
        if stream:
            list(r)  # type: ignore[call-overload]
    except openai.APIStatusError as e:
        assert e.status_code == 502, e.message
    except openai.APIError as e:  # a stream that started: an error event
        assert "internal gateway error" not in str(e)
    else:
        pytest.fail("garbage was accepted as an answer")
    assert gw.log_rows()[-1]["status"] == 502


@pytest.mark.parametrize("body", [orjson.dumps(COMPLETION), b"<html><body>upstream proxy error</body></html>\n\n"])
def test_a_stream_request_answered_without_sse_is_an_error_event(gw: RunningGateway, raw: RawUpstream, body: bytes) -> None:
    raw.script.append(Reply(chunks=[body], stream=True))
    with pytest.raises(openai.APIError) as e:
        list(oai(gw).chat.completions.create(model="m", messages=MSG, stream=True))
    assert "not an SSE stream" in str(e.value)
    assert gw.log_rows()[-1]["status"] == 502


def test_a_bug_mid_stream_ends_the_stream_with_an_error_event(gw: RunningGateway, raw: RawUpstream,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the response has started, an unexpected exception must still end it with an error event
    in the caller's dialect (never a second HTTP response written into the stream)."""
    import kaiyuan.server.sse as sse_mod

    def boom(ev: bytes, ctx: Any) -> bool:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(sse_mod, "_inspect", boom)
    raw.script.append(Reply(chunks=[GOOD_STREAM], stream=True))
    with pytest.raises(openai.APIError) as e:
        list(oai(gw).chat.completions.create(model="m", messages=MSG, stream=True))
    assert "internal gateway error (RuntimeError)" in str(e.value)
    assert gw.log_rows()[-1]["status"] == 500
    assert oai(gw).chat.completions.create  # the gateway still answers
    raw.script.append(Reply(chunks=[orjson.dumps(COMPLETION)]))
    assert oai(gw).chat.completions.create(model="m", messages=MSG).choices[0].message.content == "Hello"


def test_sse_without_the_optional_space_after_data(gw: RunningGateway, raw: RawUpstream) -> None:
    data = GOOD_STREAM.replace(b"data: ", b"data:")
    raw.script.append(Reply(chunks=[data], stream=True))
    stream = oai(gw).chat.completions.create(model="m", messages=MSG, stream=True,  # type: ignore[call-overload]
                                             stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    row = gw.log_rows()[-1]
    assert row["status"] == 200 and row["error"] is None and row["prompt_tokens"] == 3


def test_an_endless_event_is_cut_off(gw: RunningGateway, raw: RawUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    import kaiyuan.server.sse_framer as sse_mod

    monkeypatch.setattr(sse_mod, "MAX_EVENT_BYTES", 200_000)
    endless = [chunk("a")] + [b"data: " + b"x" * 50_000 for _ in range(20)]  # never a blank line
    raw.script.append(Reply(chunks=endless, stream=True))
    with pytest.raises(openai.APIError) as e:
        list(oai(gw).chat.completions.create(model="m", messages=MSG, stream=True))
    assert "larger than 200000 bytes" in str(e.value)
    assert gw.log_rows()[-1]["status"] == 502


# -- HTTP framing from the upstream -------------------------------------------------------------------
@pytest.fixture
def tcp_upstream(servers: ServerThread) -> Iterator[tuple[str, deque[bytes]]]:
    """A bare TCP server: answers each request with the next scripted bytes, then closes."""
    script: deque[bytes] = deque()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(ln.split(b":", 1)[1]) for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        writer.write(script.popleft() if script else b"HTTP/1.1 500 Nope\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def start() -> asyncio.Server:
        return await asyncio.start_server(handle, "127.0.0.1", 0)

    server = servers.call(start())
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", script

    async def stop() -> None:
        server.close()

    servers.call(stop())


@pytest.mark.parametrize("wire", [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n" + orjson.dumps(COMPLETION)[:50],
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"20\r\n" + chunk("Hel")[:32] + b"\r\nff\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nabcde\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/json\r\n\r\n" + orjson.dumps(COMPLETION),
    b"NOT HTTP AT ALL\r\n\r\n",
])
@pytest.mark.parametrize("stream", [False, True])
def test_broken_http_framing_is_a_clear_error(make_gateway: Callable[[dict[str, Any]], RunningGateway],
                                             tcp_upstream: tuple[str, deque[bytes]], wire: bytes, stream: bool) -> None:
    url, script = tcp_upstream
    g = make_gateway({"models": [openai_model("m", url, "up", routing={"retries": {"max_attempts": 1}})]})
    script.append(wire)
    try:
        r = oai(g).chat.completions.create(model="m", messages=MSG, stream=stream)
        got = _text(r) if stream else r.choices[0].message.content  # type: ignore[union-attr, arg-type]
        assert got == "Hello"  # only a well-framed answer may succeed (read to EOF: Connection: close)
    except openai.APIStatusError as e:
        assert e.status_code == 502, e.message
    except openai.APIError as e:
        assert "internal gateway error" not in str(e)
    row = g.log_rows()[-1]
    assert row["status"] in (200, 502), row


@pytest.mark.parametrize("model", ["m", "claude"])
def test_streams_return_their_upstream_connection_to_the_pool(gw: RunningGateway, raw: RawUpstream, model: str) -> None:
    """The upstream's final bytes (the end of the chunked body) often come a moment after the last
    event: the gateway must still read them, so the keep-alive connection is reused."""
    o, a = oai(gw), anth(gw)  # clients that keep their connection to the gateway open
    for _ in range(4):
        if model == "m":
            raw.script.append(Reply(chunks=[GOOD_STREAM], stream=True))
            assert _text(o.chat.completions.create(model="m", messages=MSG, stream=True)) == "Hello"
        else:
            raw.script.append(Reply(chunks=[ANTH_START + ANTH_REST], stream=True))
            with a.messages.stream(model="claude", max_tokens=10, messages=MSG) as s:  # type: ignore[arg-type]
                assert s.get_final_message().content[0].text == "Hi"  # type: ignore[union-attr]
        gw.settle()
        for _ in range(400):  # bounded: the previous stream's end is read in the background
            if not http_provider._DRAINS:
                break
            time.sleep(0.005)
    assert len(set(raw.peers)) == 1, raw.peers
    rows = gw.log_rows()
    assert len(rows) == 4 and all(r["status"] == 200 and not r["cancelled"] for r in rows)
