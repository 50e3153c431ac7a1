"""Regressions (issue 9, section 3, "more blocking on the event loop"): work that used to hold the
gateway's event loop, so that every other request waited.

Measured before: a gzip-bombed upstream stream stalled the loop for 2.5 s (aiohttp inflated each
network chunk whole), a 60 MiB upstream error body for 11 s (read whole, then scrubbed and logged
whole), a 13 MiB translated body for 4 s. Now upstream bodies are decoded by the gateway a piece
at a time up to ``max_response_bytes`` (streams: ``max_stream_bytes``), error bodies are cut at ``max_error_bytes`` (and their
connection closed, not drained), and large translations run in a worker thread.

Each end-to-end test proves the loop stayed free with a ``/healthz`` request whose head is
completed (by the hostile upstream, on its own loop) once the bad bytes are on the wire: it must
be answered before the bad request is. The decoder's own test counts loop turns between pieces.
No test asserts a duration.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import socket
import threading
import zlib
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp import web
from google import genai
from google.genai import types as genai_types

from kaiyuan.accounting.tokens import count_prompt
from kaiyuan.codecs import PIECE, decoder
from kaiyuan.config import OpenAICompatibleDeployment
from kaiyuan.context import RequestContext
from kaiyuan.dialects import anthropic as anth
from kaiyuan.errors import GatewayError
from kaiyuan.offload import big, maybe_off_loop
from kaiyuan.providers.base import UpstreamCall, UpstreamReply
from kaiyuan.providers.openai_compatible import OpenAICompatibleProvider
from kaiyuan.providers.reply_body import decoded_stream, reply_decoder
from kaiyuan.server import translate
from kaiyuan.testing.harness import RunningGateway
from kaiyuan.testing.server_thread import ServerThread
from tests.conftest import openai_model

MSG = [{"role": "user", "content": "hi"}]
COMPLETION = {"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
              "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
KEY = "sk-upstream-" + "k" * 24  # the deployment's key, echoed by the hostile upstream
EVENT = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":'
         b'[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}\n\n')


@lru_cache(maxsize=4)
def gzip_bomb(unit: bytes, times: int, head: bytes = b"") -> bytes:
    """``head`` then ``unit`` repeated ``times`` times, gzipped (a few KB per hundred MB)."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [z.compress(head)]
    for _ in range(times):
        out.append(z.compress(unit))
    out.append(z.flush())
    return b"".join(out)


class Hostile:
    """An upstream on its own event loop (so that the gateway's loop is the only one measured):
    ``mode`` picks the bad reply; ``delivered`` is called once the bad bytes are on the wire."""

    def __init__(self) -> None:
        self.mode = ""
        self.delivered: Callable[[], None] = lambda: None
        self.sent = 0  # bytes of the body written before the gateway stopped reading
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_route("POST", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if self.mode == "translated":  # answer how many messages arrived, once the translated body is in
            n = len(orjson.loads(raw)["messages"])
            return web.json_response({**COMPLETION, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": f"{n} messages"}, "finish_reason": "stop"}]})
        if self.mode == "error":
            return await self._error_body(request)
        sse = self.mode == "bomb-stream"
        body = gzip_bomb(EVENT, 1_000_000) if sse else gzip_bomb(b"0" * 1024 * 1024, 256, b'{"id": "')
        resp = web.StreamResponse(headers={"Content-Encoding": "gzip",
                                           "Content-Type": "text/event-stream" if sse else "application/json"})
        await resp.prepare(request)
        await resp.write(body)
        self.delivered()
        await resp.write_eof()
        return resp

    async def _error_body(self, request: web.Request) -> web.StreamResponse:
        """A 500 whose 60 MiB body echoes the key first; written a MiB at a time until the gateway hangs up."""
        size = 60 * 1024 * 1024
        head = b'{"error": {"message": "Incorrect API key provided: ' + KEY.encode() + b". "
        resp = web.StreamResponse(status=500, headers={"Content-Type": "application/json", "Content-Length": str(size)})
        await resp.prepare(request)
        self.delivered()
        data = head + b"e" * (size - len(head))
        try:
            for i in range(0, size, 1024 * 1024):
                await resp.write(data[i:i + 1024 * 1024])
                self.sent = i + 1024 * 1024
        except (ConnectionError, RuntimeError):  # the gateway closed the connection
            return resp
        return resp


@pytest.fixture(scope="module")
def hostile_servers() -> Iterator[ServerThread]:
    st = ServerThread()
    yield st
    st.close()


@pytest.fixture
def hostile(hostile_servers: ServerThread) -> Iterator[tuple[Hostile, str]]:
    up = Hostile()
    url = hostile_servers.serve(up.app)
    yield up, url
    hostile_servers.stop(up.app)


class HealthProbe:
    """A ``/healthz`` request sent but for its last CRLF: :meth:`complete` (from any thread) puts a
    whole request in the gateway's socket at the moment chosen; when its answer is read, "health"
    goes into ``order``."""

    def __init__(self, url: str, order: list[str]) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        self.sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n")
        self.order = order
        self.answer = b""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def complete(self) -> None:
        self.sock.sendall(b"\r\n")

    def _read(self) -> None:
        while b'{"status":"ok"}' not in self.answer:
            data = self.sock.recv(65536)
            if not data:
                break
            self.answer += data
        self.order.append("health")

    def result(self) -> bytes:
        self.thread.join(60)
        self.sock.close()
        return self.answer


def gateway(make_gateway: Callable[[dict[str, Any]], RunningGateway], url: str, **dep: Any) -> RunningGateway:
    one = {"retries": {"max_attempts": 1}}
    return make_gateway({"models": [
        openai_model("m", url, routing=one, deployment={"api_key": KEY, **dep}),
        {"name": "claude-on-m", "routing": one, "deployments": [
            {"provider": "openai_compatible", "base_url": url + "/v1", "model": "m", "api_key": KEY, **dep}]},
    ]})


def test_a_gzip_bomb_reply_is_a_502_and_the_loop_stays_free(make_gateway: Any, hostile: tuple[Hostile, str]) -> None:
    up, url = hostile
    gw = gateway(make_gateway, url)
    up.mode = "bomb"  # 256 MiB once inflated, 256 KB on the wire; the limit is 64 MiB
    order: list[str] = []
    probe = HealthProbe(gw.url, order)
    up.delivered = probe.complete
    with pytest.raises(openai.APIStatusError) as e:
        openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0, timeout=60).chat.completions.create(
            model="m", messages=MSG)  # type: ignore[arg-type]
    order.append("bad")
    assert b"200 OK" in probe.result()
    assert order == ["health", "bad"]
    assert e.value.status_code == 502
    assert e.value.code == "upstream_reply_too_large"
    assert "max_response_bytes" in e.value.message and "after decompression" in e.value.message


def test_a_gzip_bombed_stream_ends_with_an_error_event_and_the_loop_stays_free(
        make_gateway: Any, hostile: tuple[Hostile, str]) -> None:
    up, url = hostile
    limit = 4 * 1024 * 1024
    gw = gateway(make_gateway, url, max_stream_bytes=limit)
    up.mode = "bomb-stream"  # a million events (about 140 MB) in 300 KB of gzip
    order: list[str] = []
    probe = HealthProbe(gw.url, order)
    up.delivered = probe.complete
    client = anthropic.Anthropic(base_url=gw.url, api_key="x", max_retries=0, timeout=60)
    got = []
    with pytest.raises(anthropic.APIStatusError) as e:
        with client.messages.stream(model="claude-on-m", max_tokens=10**6, messages=MSG) as s:  # type: ignore[arg-type]
            for text in s.text_stream:
                got.append(text)
    order.append("bad")
    assert b"200 OK" in probe.result()
    assert order == ["health", "bad"]
    assert 0 < len(got) < limit // len(EVENT) + 1  # it streamed, and stopped at the limit
    assert "max_stream_bytes" in str(e.value) and "after decompression" in str(e.value)
    gw.settle()
    assert gw.log_rows()[-1]["status"] == 502


def test_a_60_mib_error_body_is_cut_redacted_and_not_drained(make_gateway: Any, hostile: tuple[Hostile, str]) -> None:
    up, url = hostile
    gw = gateway(make_gateway, url)
    up.mode = "error"
    order: list[str] = []
    probe = HealthProbe(gw.url, order)
    up.delivered = probe.complete
    with pytest.raises(openai.InternalServerError) as e:
        openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0, timeout=60).chat.completions.create(
            model="m", messages=MSG)  # type: ignore[arg-type]
    order.append("bad")
    assert b"200 OK" in probe.result()
    assert order == ["health", "bad"]
    assert e.value.status_code == 500  # the upstream's status, kept
    msg = e.value.message
    assert "Incorrect API key provided: [REDACTED]" in msg and KEY not in msg
    assert "error body cut at 1048576 bytes: max_error_bytes" in msg
    assert len(msg) < 10_000
    assert up.sent < 60 * 1024 * 1024  # the gateway closed the connection: the rest was never read
    gw.settle()
    row = gw.log_rows()[-1]
    assert row["status"] == 500 and KEY not in row["error"]


def big_conversation(size: int) -> list[dict[str, Any]]:
    """About ``size`` bytes of conversation in many small messages: the shape that costs the most
    Python work per byte when translated."""
    n = size // 220
    return [{"role": "user" if i % 2 == 0 else "assistant",
             "content": [{"type": "text", "text": f"turn {i} " + "w" * 80}, {"type": "text", "text": "v" * 80}]}
            for i in range(n)] + [{"role": "user", "content": "the end"}]


def test_a_13_mib_translated_body_is_served_and_the_loop_stays_free(
        make_gateway: Any, hostile: tuple[Hostile, str]) -> None:
    up, url = hostile
    gw = make_gateway({"server": {"max_body_bytes": 32 * 1024 * 1024}, "models": [
        {"name": "claude-on-m", "deployments": [
            {"provider": "openai_compatible", "base_url": url + "/v1", "model": "m", "api_key": KEY}]}]})
    up.mode = "translated"
    messages = big_conversation(13 * 1024 * 1024)
    body = orjson.dumps({"model": "claude-on-m", "max_tokens": 10, "messages": messages})
    order: list[str] = []
    probe = HealthProbe(gw.url, order)
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=120) as s:  # a raw client: it knows when it has sent
        s.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        probe.complete()  # the whole body is sent: the gateway parses and translates it now
        answer = b""
        while not answer.endswith(b"}"):
            more = s.recv(65536)
            if not more:
                break
            answer += more
    order.append("bad")
    assert b"200 OK" in probe.result()
    assert order == ["health", "bad"]
    assert answer.startswith(b"HTTP/1.1 200")
    assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["content"][0]["text"] == f"{len(messages)} messages"


def test_a_large_gemini_count_is_counted_off_the_loop_and_right(make_gateway: Any, hostile: tuple[Hostile, str]) -> None:
    """countTokens of a 2 MiB prompt (tokenized in a worker thread) gives the gateway's own count."""
    _up, url = hostile
    gw = make_gateway({"models": [openai_model("gpt-4o", url)]})
    text = "one two three four five " * 90_000
    assert big(len(text))
    client = genai.Client(api_key="x", http_options=genai_types.HttpOptions(base_url=gw.url, retry_options=None))
    got = client.models.count_tokens(model="gpt-4o", contents=text)
    assert got.total_tokens == count_prompt("gpt-4o", {"contents": [{"role": "user", "parts": [{"text": text}]}]})


async def _ticking(work: Any) -> tuple[Any, int]:
    """Await ``work`` while a task counts the loop's turns: (its result, the turns taken meanwhile)."""
    turns = 0

    async def ticker() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.get_running_loop().create_task(ticker())
    await asyncio.sleep(0)
    start = turns
    try:
        return await work, turns - start
    finally:
        task.cancel()


async def test_a_large_translation_lets_the_loop_run_and_a_small_one_stays_inline() -> None:
    """A large body is translated in a worker thread, both ways, and the loop keeps turning
    meanwhile; a small one is translated inline (no thread hop on the plain path)."""
    body = {"model": "m", "max_tokens": 10, "messages": big_conversation(4 * 1024 * 1024)}
    raw = orjson.dumps(body)
    dep = OpenAICompatibleDeployment(provider="openai_compatible", base_url="http://127.0.0.1:1/v1", model="m")
    provider = OpenAICompatibleProvider(dep)
    canon: list[Any] = []
    work = maybe_off_loop(len(raw), translate.translated_call, provider, anth.request_to_canonical, body, canon)
    assert inspect.isawaitable(work)
    call, turns = await _ticking(work)
    assert turns > 1 and len(call.body["messages"]) == len(body["messages"])
    small = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    inline = maybe_off_loop(len(orjson.dumps(small)), translate.translated_call, provider, anth.request_to_canonical,
                            small, [])
    assert isinstance(inline, UpstreamCall)

    reply = orjson.dumps({**COMPLETION, "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{i}", "type": "function", "function": {"name": "f", "arguments": f'{{"i": {i}}}'}}
            for i in range(40_000)]}}]})
    assert big(len(reply))
    ctx = RequestContext("r", "anthropic", "messages")
    work = translate.whole_reply(ctx, "openai", UpstreamReply(200, {}, body=reply), None, anth.response_from_canonical, "m")
    assert inspect.isawaitable(work)
    data, turns = await _ticking(work)
    assert turns > 1 and len(orjson.loads(data)["content"]) == 40_000


# -- the decoder itself: a turn of the loop between two pieces of one chunk ----------------------
async def _one(data: bytes) -> Any:
    yield data


async def test_decoding_gives_the_loop_a_turn_between_pieces() -> None:
    """A single network chunk that inflates to 32 pieces: the loop runs between every two of them
    (a concurrent task advances), and the limit stops the decoding at once."""
    bomb = gzip_bomb(b"\0" * PIECE, 32)
    turns = 0

    async def ticker() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.get_running_loop().create_task(ticker())
    await asyncio.sleep(0)
    seen = [turns async for _piece in decoded_stream(_one(bomb), decoder("gzip"), 1 << 30, "t")]
    assert len(seen) >= 32
    assert all(b > a for a, b in itertools.pairwise(seen))
    with pytest.raises(GatewayError, match="max_stream_bytes"):
        async for _piece in decoded_stream(_one(bomb), decoder("gzip"), 3 * PIECE, "t"):
            pass
    task.cancel()


def test_an_unknown_coding_is_an_error_not_bytes() -> None:
    with pytest.raises(GatewayError, match="cannot decode"):
        reply_decoder({"Content-Encoding": "compress"}, "t")
    with pytest.raises(GatewayError, match="cannot decode"):
        reply_decoder({"Content-Encoding": "gzip, br"}, "t")
    assert reply_decoder({"Content-Encoding": "identity"}, "t") is None
