"""Regressions (issue 9, section 3): request bodies that used to cost the gateway gigabytes or a 500.

- A 3 KB Brotli body inflated to 4.1 GB before auth: every coding is now decoded incrementally and
  stops at ``server.max_body_bytes`` (413 in the caller's dialect).
- JSON nested 255+ levels (orjson could not re-serialise it) and ~990 levels (a recursion error)
  gave 500s: now a 400 naming ``server.max_json_depth``, before anything reaches an upstream.
- ``?resamples=abc`` on the trials report gave a 500: now a 400.
"""

from __future__ import annotations

import gzip
from typing import Any

import aiohttp
import anthropic
import brotli
import pytest
import zstandard

from kaiyuan.codecs import DECODE_ERRORS, PIECE, TooLarge, decode_all
from kaiyuan.testing.fake_openai import FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.conftest import openai_model

BOMB = b"\0" * (64 * 1024 * 1024)  # inflates 64 MiB; on the wire a few KB
COMPRESS = {
    "br": lambda raw: brotli.compress(raw, quality=5),
    "gzip": lambda raw: gzip.compress(raw, 9),
    "zstd": lambda raw: zstandard.ZstdCompressor(level=3).compress(raw),
}


async def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.post(url, data=body, headers={"Content-Type": "application/json", **headers}) as r:
        return r.status, await r.json(content_type=None)


@pytest.fixture
def gw(make_gateway: Any, fake_openai: FakeOpenAI) -> RunningGateway:
    return make_gateway({"server": {"max_body_bytes": 1_000_000}, "models": [openai_model("m", fake_openai.url)]})


@pytest.mark.parametrize("coding", sorted(COMPRESS))
async def test_compression_bomb_is_a_413_not_gigabytes(gw: RunningGateway, fake_openai: FakeOpenAI, coding: str) -> None:
    wire = COMPRESS[coding](b'{"model": "m", "messages": [{"role": "user", "content": "' + BOMB + b'"}]}')
    assert len(wire) < 300_000
    status, body = await post(gw.base_url + "/chat/completions", wire, {"Content-Encoding": coding})
    assert status == 413, body
    assert "server.max_body_bytes" in body["error"]["message"]
    status, body = await post(gw.base_url + "/messages", wire, {"Content-Encoding": coding})
    assert status == 413 and body["type"] == "error" and body["error"]["type"] == "request_too_large"
    assert fake_openai.requests == []


@pytest.mark.parametrize("coding", sorted(COMPRESS))
async def test_each_coding_still_decodes_a_real_body(gw: RunningGateway, fake_openai: FakeOpenAI, coding: str) -> None:
    wire = COMPRESS[coding](b'{"model": "m", "messages": [{"role": "user", "content": "hello there"}]}')
    status, body = await post(gw.base_url + "/chat/completions", wire, {"Content-Encoding": coding})
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "echo: hello there"


@pytest.mark.parametrize("coding", ["br", "gzip", "deflate", "zstd"])
def test_decoders_stop_at_the_limit_and_in_pieces(coding: str) -> None:
    import zlib

    raw = BOMB[: 8 * 1024 * 1024]
    wire = zlib.compress(raw) if coding == "deflate" else COMPRESS[coding](raw)
    with pytest.raises(TooLarge):
        decode_all(wire, coding, 1024 * 1024)
    assert decode_all(wire, coding, len(raw)) == raw
    with pytest.raises(DECODE_ERRORS):
        decode_all(wire[: len(wire) // 2], coding, len(raw)) if coding != "zstd" else decode_all(b"garbage!", coding, 10)
    assert PIECE < 1024 * 1024


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [129, 255, 990])
async def test_deep_json_is_a_400_in_both_dialects(gw: RunningGateway, fake_openai: FakeOpenAI, depth: int) -> None:
    body = ('{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "metadata": {"x": '
            + nested(depth) + "}}").encode()
    status, err = await post(gw.base_url + "/chat/completions", body, {})
    assert status == 400 and "server.max_json_depth" in err["error"]["message"], err
    status, err = await post(gw.base_url + "/messages", body, {})
    assert status == 400 and err["error"]["type"] == "invalid_request_error", err
    assert fake_openai.requests == []


async def test_json_at_the_depth_limit_is_served(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    # the body object is level 1, "metadata" level 2, "x" level 3: 125 more arrays reach 128
    body = ('{"model": "m", "messages": [{"role": "user", "content": "hi"}], "metadata": {"x": ' + nested(125) + "}}").encode()
    status, out = await post(gw.base_url + "/chat/completions", body, {})
    assert status == 200, out


def test_deep_json_through_the_anthropic_sdk(gw: RunningGateway) -> None:
    client = anthropic.Anthropic(base_url=gw.url, api_key="none", max_retries=0)
    deep: Any = "x"
    for _ in range(300):
        deep = [deep]
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}],
                               metadata={"user_id": "u"}, extra_body={"deep": deep})
    assert "max_json_depth" in str(e.value)


async def test_bad_resamples_is_a_400(make_gateway: Any, fake_openai: FakeOpenAI) -> None:
    g = make_gateway({"server": {"master_key": "sk-master-key"},
                      "models": [openai_model("inc", fake_openai.url), openai_model("cand", fake_openai.url)],
                      "trials": [{"name": "t", "incumbent": "inc", "candidates": ["cand"]}]})
    admin = {"Authorization": "Bearer sk-master-key"}
    async with aiohttp.ClientSession(headers=admin) as s:
        for bad in ("abc", "-1", "0", "99999999", "1e9"):
            async with s.get(f"{g.url}/admin/trials/t?resamples={bad}") as r:
                assert r.status == 400, await r.text()
                assert "'resamples'" in (await r.json())["error"]["message"]
        async with s.get(f"{g.url}/admin/trials/t?resamples=50") as r:
            assert r.status == 200
