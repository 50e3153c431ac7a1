"""Regression (issue 9, section 3, "more blocking on the event loop"): the JSON parse of a large
request body held the event loop.

Measured before: orjson parsed a 13 MiB body (up to ``server.max_body_bytes``) in one C call, on
the loop, 0.25-0.9 s on a busy machine, while every other request waited; a worker thread would not
have helped (orjson keeps the GIL for the whole call). Now a body of 1 MiB or more is parsed a
piece (256 KiB) at a time with a turn of the loop between pieces (``offload.loads_large``).

The end-to-end test completes another client's ``/healthz`` request once the large body's parse
has begun, and the large body is invalid only at its very end (bytes that are not UTF-8, which only
the last piece's parse sees): the health answer must come before the large body's 400. No test
asserts a duration.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from kaiyuan import offload
from kaiyuan.errors import GatewayError
from kaiyuan.server import common
from kaiyuan.server.common import check_depth
from kaiyuan.testing.fake_openai import FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.conftest import openai_model
from tests.regressions.test_r_harden_loop import HealthProbe, _ticking, big_conversation


def _send_raw(gw: RunningGateway, body: bytes, path: bytes = b"/v1/chat/completions",
              first: Callable[[], None] = lambda: None) -> bytes:
    """POST ``body`` as a raw client and read the whole answer (Content-Length framed); ``first`` is
    called when its first bytes arrive."""
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=120) as s:
        s.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            more = s.recv(65536)
            if not more:
                break
            if not answer:
                first()
            answer += more
    return answer


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 1 << 62


def test_a_small_request_is_answered_while_a_13_mib_body_is_parsed(
        make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI,
        monkeypatch: pytest.MonkeyPatch) -> None:
    gw = make_gateway({"server": {"max_body_bytes": 32 * 1024 * 1024}, "models": [openai_model("m", fake_openai.url)]})
    messages = big_conversation(13 * 1024 * 1024)
    body = orjson.dumps({"model": "m", "messages": messages})
    body = body[:-4] + b'\xff"}]}'  # the last message's text ends in a byte that is not UTF-8
    assert body.endswith(b'the end\xff"}]}')
    order: list[str] = []
    probe = HealthProbe(gw.url, order)
    parse = offload.loads_large

    async def spied(raw: bytes, max_depth: int, check: Any) -> Any:
        probe.complete()  # the health request is whole now: once the parse has begun
        return await parse(raw, max_depth, check)

    monkeypatch.setattr(common, "loads_large", spied)
    answer = _send_raw(gw, body)
    order.append("bad")
    assert b"200 OK" in probe.result()
    assert order == ["health", "bad"]
    assert answer.startswith(b"HTTP/1.1 400")
    err = orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert err["code"] == "invalid_json" and "not valid JSON" in err["message"]
    assert fake_openai.requests == []


def test_a_large_valid_body_is_served_whole(make_gateway: Callable[[dict[str, Any]], RunningGateway],
                                            fake_openai: FakeOpenAI) -> None:
    """The pieces make the same body: the upstream receives every message, unchanged."""
    gw = make_gateway({"server": {"max_body_bytes": 32 * 1024 * 1024}, "models": [openai_model("m", fake_openai.url)]})
    messages = [{"role": "user", "content": f"turn {i} " + "é" * 200} for i in range(6000)]
    body = orjson.dumps({"model": "m", "messages": messages, "temperature": 0.25, "seed": 2**62})
    assert offload.big(len(body))
    answer = _send_raw(gw, body)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    sent = fake_openai.requests[-1]
    assert sent["messages"] == messages and sent["seed"] == 2**62 and sent["temperature"] == 0.25


# -- the piece parser itself ----------------------------------------------------------------------
def _bodies() -> list[bytes]:
    conv = big_conversation(3 * 1024 * 1024)
    return [
        orjson.dumps({"model": "m", "messages": conv}),
        # one message larger than a piece (split again), one huge string, numbers and unicode
        orjson.dumps({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "ü😀 " * 40_000} for _ in range(12)]}], "n": [1.5, -0.0, 2**64 - 1, None, True],
            "big": "x" * (2 * 1024 * 1024)}),
        b'  \n{"model": "m", "messages": ' + orjson.dumps(conv) + b'}\n  ',  # whitespace around the value
    ]


@pytest.mark.parametrize("raw", _bodies(), ids=["many-messages", "large-members", "whitespace"])
async def test_pieces_parse_to_what_orjson_parses(raw: bytes) -> None:
    assert offload.big(len(raw))
    assert await offload.loads_large(raw, 128, check_depth) == orjson.loads(raw)


async def test_the_loop_turns_while_a_large_body_is_parsed() -> None:
    raw = orjson.dumps({"model": "m", "messages": big_conversation(4 * 1024 * 1024)})
    body, turns = await _ticking(offload.loads_large(raw, 128, check_depth))
    assert turns >= len(raw) // offload.PIECE_BYTES - 1
    assert body == orjson.loads(raw)


PAD = b'"' + b"p" * (2 * 1024 * 1024) + b'"'  # makes each body large


@pytest.mark.parametrize(("raw", "code"), [
    (b'{"a": "b", "pad": ' + PAD + b",}", "invalid_json"),  # a trailing comma
    (b'{"a": "b", "pad": ' + PAD + b"} x", "invalid_json"),  # something after the value
    (b'{"a": "\xff", "pad": ' + PAD + b"}", "invalid_json"),  # not UTF-8
    (b'{"a": NaN, "pad": ' + PAD + b"}", "invalid_json"),
    (b'{"pad": ' + PAD + b', "a": [' + b"[" * 130 + b"]" * 130 + b"]}", "json_too_deep"),
    (b'{"pad": ' + PAD + b', "a": ' + b"[" * 3_000_000 + b"]" * 3_000_000 + b"}", "json_too_deep"),
    (b"[" * 3_000_000 + b"]" * 3_000_000, "json_too_deep"),
    (b'{"a": ' + b'{"k": ' * 128 + PAD + b"}" * 128 + b"}", "json_too_deep"),  # deep, each level large
])
async def test_bad_large_bodies_are_400s_as_small_ones_are(raw: bytes, code: str) -> None:
    with pytest.raises(GatewayError) as e:
        await offload.loads_large(raw, 128, check_depth)
    assert e.value.status == 400 and e.value.code == code


async def test_nesting_up_to_the_limit_is_accepted() -> None:
    raw = b'{"pad": ' + PAD + b', "a": [' + b'{"k": ' * 126 + b"1" + b"}" * 126 + b"]}"
    body = await offload.loads_large(raw, 128, check_depth)  # 128 levels: the body, "a", 126 objects
    assert body == orjson.loads(raw)
    deep = b'{"a": ' + b'{"k": ' * 127 + PAD + b"}" * 127 + b"}"  # 128 levels, every one larger than a piece
    assert await offload.loads_large(deep, 128, check_depth) == orjson.loads(deep)


# -- a compressed body is decoded with the loop turning -------------------------------------------
@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
async def test_a_small_body_inflating_to_megabytes_lets_the_loop_turn(coding: str) -> None:
    """A few bytes that inflate to 16 MiB (50-110 ms in one call before): decoded a piece at a
    time, the loop turning between pieces; the limit still stops it."""
    import zlib

    import brotli
    import zstandard

    from kaiyuan.codecs import PIECE, TooLarge, decode_all, decode_all_turning

    data = b"\0" * (16 * 1024 * 1024)
    packed = {"gzip": lambda b: zlib.compress(b, 9, wbits=31), "deflate": zlib.compress,
              "br": brotli.compress, "zstd": lambda b: zstandard.ZstdCompressor().compress(b)}[coding](data)
    assert len(packed) < 100_000
    out, turns = await _ticking(decode_all_turning(packed, coding, len(data)))
    assert out == data == decode_all(packed, coding, len(data))
    assert turns >= len(data) // (2 * PIECE) - 1  # a turn per piece (brotli's steps may reach twice PIECE)
    with pytest.raises(TooLarge):
        await decode_all_turning(packed, coding, len(data) - 1)


# -- a large whole upstream reply is parsed in pieces too -----------------------------------------
def _completion(calls: int) -> bytes:
    """An object-dense chat completion (``calls`` tool calls) of about 300 bytes a call."""
    return orjson.dumps({"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
                         "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
                         "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                             "role": "assistant", "content": None, "tool_calls": [
                                 {"id": f"call_{i}", "type": "function",
                                  "function": {"name": "f", "arguments": f'{{"i": {i}, "pad": "{"p" * 200}"}}'}}
                                 for i in range(calls)]}}]})


@pytest.fixture
def whole_upstream(servers: Any) -> Any:
    from aiohttp import web

    replies: list[bytes] = []

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=replies.pop(0), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    url = servers.serve(app)
    yield url, replies
    servers.stop(app)


def test_a_small_request_is_answered_while_a_large_reply_is_parsed(
        make_gateway: Callable[[dict[str, Any]], RunningGateway], whole_upstream: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from kaiyuan.routing import executor

    url, replies = whole_upstream
    gw = make_gateway({"models": [openai_model("m", url, routing={"retries": {"max_attempts": 1}})]})
    reply = _completion(45_000)
    assert len(reply) > 13 * 1024 * 1024
    replies.append(reply)
    order: list[str] = []
    probe = HealthProbe(gw.url, order)
    parse = executor.loads_in_pieces

    async def spied(raw: bytes) -> Any:
        probe.complete()  # the health request is whole now: once the reply's parse has begun
        return await parse(raw)

    monkeypatch.setattr(executor, "loads_in_pieces", spied)
    answer = _send_raw(gw, orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
                       first=lambda: order.append("bad"))  # its answer begins once the parse is over
    assert b"200 OK" in probe.result()
    assert order == ["health", "bad"]
    assert answer.startswith(b"HTTP/1.1 200")
    got = orjson.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert len(got["choices"][0]["message"]["tool_calls"]) == 45_000


@pytest.mark.parametrize(("body", "why"), [
    (_completion(5000)[:-1], "not JSON"),  # cut short
    (b"[" + _completion(5000) + b"]", "not an object"),
    (orjson.dumps({"error": {"message": "overloaded"}, "pad": "x" * (2 * 1024 * 1024)}), "with an error: overloaded"),
])
def test_a_bad_large_reply_is_a_502_naming_what_is_wrong(make_gateway: Callable[[dict[str, Any]], RunningGateway],
                                                         whole_upstream: Any, body: bytes, why: str) -> None:
    import openai

    url, replies = whole_upstream
    gw = make_gateway({"models": [openai_model("m", url, routing={"retries": {"max_attempts": 1}})]})
    assert offload.big(len(body))
    replies.append(body)
    with pytest.raises(openai.APIStatusError) as e:
        openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 502 and why in e.value.message
