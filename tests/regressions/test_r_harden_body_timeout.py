"""Regression (issue 9, section 3, slowloris): a client that sends its request head and then stalls
the body must not hold a handler for ever. The body must arrive within ``server.body_timeout_s``;
past it the client gets a 408 in its own dialect (``server.common.read_json``)."""

from __future__ import annotations

import socket
from typing import Any

import orjson
import pytest

from kaiyuan.testing.fake_openai import FakeOpenAI
from tests.conftest import openai_model

BODY = orjson.dumps({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})


def stalled(url: str, path: str, chunked: bool) -> tuple[int, dict[str, Any]]:
    """Send the head and the first 10 bytes of the body, then nothing: the gateway's answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        framing = b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % len(BODY)
        s.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                  + framing + b"\r\n")
        s.sendall(b"a\r\n" + BODY[:10] + b"\r\n" if chunked else BODY[:10])
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            more = s.recv(65536)
            if not more:
                break
            data += more
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), orjson.loads(body[:_length(data)])


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 1 << 30


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_stalled_body_is_a_408_in_the_callers_dialect(make_gateway: Any, fake_openai: FakeOpenAI, chunked: bool) -> None:
    gw = make_gateway({"server": {"body_timeout_s": 0.5}, "models": [openai_model("m", fake_openai.url)]})
    status, err = stalled(gw.url, "/v1/chat/completions", chunked)
    assert status == 408, err
    assert err["error"]["code"] == "request_timeout" and "server.body_timeout_s" in err["error"]["message"]
    status, err = stalled(gw.url, "/v1/messages", chunked)
    assert status == 408 and err["type"] == "error", err
    assert "server.body_timeout_s" in err["error"]["message"]
    assert fake_openai.requests == []
    gw.settle()
    rows = gw.log_rows()
    assert [r["status"] for r in rows] == [408, 408]
