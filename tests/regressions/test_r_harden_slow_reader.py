"""Regression (issue 9, section 3): clients that stop reading pinned upstream connections past
``timeouts.total``, and everyone else got 504s. The deadline now covers writing to the client
(``server.deadline``): past it the client is dropped and the upstream request closed."""

from __future__ import annotations

import socket
import time
from typing import Any

import openai
import orjson

from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI
from tests.conftest import openai_model

BIG_EVENT = b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                                      "choices": [{"index": 0, "delta": {"content": "x" * 65536}, "finish_reason": None}]}) + b"\n\n"


def request_bytes(stream: bool) -> bytes:
    body = orjson.dumps({"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body


def gateway(make_gateway: Any, fake_openai: FakeOpenAI) -> Any:
    dep = {"timeouts": {"total": 2}, "max_connections": 4}
    return make_gateway({"models": [openai_model("m", fake_openai.url, deployment=dep)]})


def wait_for(cond: Any, bound: float = 30.0) -> bool:
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_a_stream_client_that_stops_reading_releases_the_upstream(make_gateway: Any, fake_openai: FakeOpenAI) -> None:
    gw = gateway(make_gateway, fake_openai)
    fake_openai.next(*[Behaviour(raw_stream=[BIG_EVENT] * 2000, omit_done=True) for _ in range(4)])
    port = int(gw.url.rsplit(":", 1)[1])
    stuck = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]  # as many as the upstream pool holds
    for s in stuck:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(request_bytes(stream=True))  # ... and never read
    try:
        assert wait_for(lambda: fake_openai.cancelled >= 4), "the upstream streams were never closed"
        client = openai.OpenAI(base_url=gw.base_url, api_key="none", timeout=30, max_retries=0)
        out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "my turn"}])
        assert out.choices[0].message.content == "echo: my turn"
    finally:
        for s in stuck:
            s.close()
    gw.settle()
    rows = [r for r in gw.log_rows() if r["status"] == 504]
    assert len(rows) == 4 and all("timeouts.total" in r["error"] for r in rows)


def test_a_whole_body_client_that_stops_reading_is_dropped(make_gateway: Any, fake_openai: FakeOpenAI) -> None:
    gw = gateway(make_gateway, fake_openai)
    fake_openai.next(Behaviour(content="y" * 24_000_000))  # more than the sockets' buffers hold
    port = int(gw.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(request_bytes(stream=False))
        assert wait_for(lambda: bool(gw.log_rows()))  # answered and recorded; now being written
        gw.settle()
        time.sleep(3)  # past the deadline (2 s) and the 1 s a whole body always gets
        got = 0
        s.settimeout(10)
        try:
            while chunk := s.recv(1 << 20):
                got += len(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
    assert got < 24_000_000  # the connection was dropped before the whole answer went out
