"""Request bodies with a Content-Encoding: the gateway decodes what it can (gzip, deflate; br when
Brotli is installed) and answers any other coding with a 415 in the caller's dialect (with an
``Accept-Encoding`` header, RFC 7694), never aiohttp's plain-text 400. A body that inflates past
``server.max_body_bytes`` is a 413, however small it was on the wire."""

from __future__ import annotations

import gzip
import http.client
import zlib
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from kaiyuan.server.common import DECODABLE
from kaiyuan.testing.fake_openai import FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.conftest import openai_model

PATHS = ["/v1/chat/completions", "/v1/messages"]
BODY = orjson.dumps({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
MAX = 100_000


@pytest.fixture
def gw(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI) -> RunningGateway:
    return make_gateway({"server": {"max_body_bytes": MAX},
                         "models": [openai_model("m", fake_openai.url)]})  # type: ignore[attr-defined]


def _post(g: RunningGateway, path: str, body: bytes, encoding: str) -> tuple[int, Any, Any]:
    u = urlsplit(g.url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=20)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", "Content-Encoding": encoding})
        r = conn.getresponse()
        content = r.read()
        assert r.getheader("Content-Type", "").startswith("application/json"), (r.status, content[:200])
        return r.status, r.headers, orjson.loads(content)
    finally:
        conn.close()


def _shape(path: str, data: Any) -> str:
    if path == "/v1/messages":
        assert data["type"] == "error" and isinstance(data["error"]["message"], str), data
    else:
        assert set(data) == {"error"} and isinstance(data["error"]["message"], str), data
    return str(data["error"]["message"])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("encoding", [e for e in ("br", "zstd", "x-made-up", "gzip, compress") if e not in DECODABLE])
def test_undecodable_encoding_is_415_in_the_callers_dialect(gw: RunningGateway, path: str, encoding: str) -> None:
    status, headers, data = _post(gw, path, b"\x8b\x00 not what it says" * 4, encoding)
    assert status == 415, data
    assert "Content-Encoding" in _shape(path, data)
    assert "gzip" in headers["Accept-Encoding"]
    assert _post(gw, path, BODY, "identity")[0] == 200  # the connection and the gateway are fine


def _raw_deflate(b: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(b) + c.flush()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("encoding", "body"), [
    ("gzip", gzip.compress(BODY)),
    ("x-gzip", gzip.compress(BODY)),
    ("GZip", gzip.compress(BODY[:30]) + gzip.compress(BODY[30:])),  # two gzip members, any case
    ("deflate", zlib.compress(BODY)),
    ("deflate", _raw_deflate(BODY)),
    ("identity", BODY),
    ("gzip, gzip", gzip.compress(gzip.compress(BODY))),
], ids=["gzip", "x-gzip", "two-members", "deflate-zlib", "deflate-raw", "identity", "gzip-twice"])
def test_decodable_bodies_are_answered(gw: RunningGateway, path: str, encoding: str, body: bytes) -> None:
    status, _, data = _post(gw, path, body, encoding)
    assert status == 200, data


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("body", "status"), [
    (gzip.compress(b'{"model": "m", "x": "' + b"0" * (MAX * 3) + b'"}'), 413),  # small on the wire, big decoded
    (gzip.compress(BODY)[:-12], 400),  # cut short
    (b"not gzip at all", 400),
], ids=["inflates-too-large", "cut-short", "not-gzip"])
def test_bad_compressed_bodies_are_4xx_in_the_callers_dialect(gw: RunningGateway, path: str, body: bytes,
                                                             status: int) -> None:
    got, _, data = _post(gw, path, body, "gzip")
    assert got == status, data
    msg = _shape(path, data)
    if status == 413:
        assert str(MAX) in msg and "max_body_bytes" in msg
