"""``max_response_bytes``: a whole upstream body (a JSON answer or an error body) larger than the
deployment's limit is a clear 502 naming the limit and the key, whatever way it arrives (with a
Content-Length, chunked, or compressed small and large once decompressed)."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from typing import Any

import anthropic
import openai
import orjson
import pytest

from kaiyuan.config import ConfigError, parse_config
from kaiyuan.testing.harness import RunningGateway
from tests.conftest import openai_model
from tests.test_upstream_garbage import COMPLETION, RawUpstream, Reply, raw  # noqa: F401  (fixture)

LIMIT = 4096
MSG = [{"role": "user", "content": "hi"}]
BIG = orjson.dumps({**COMPLETION, "id": "x" * 10_000})


@pytest.fixture
def limited(make_gateway: Callable[[dict[str, Any]], RunningGateway], raw: RawUpstream) -> RunningGateway:  # noqa: F811
    one = {"retries": {"max_attempts": 1}}
    return make_gateway({"models": [
        openai_model("m", raw.url, "up", routing=one, deployment={"max_response_bytes": LIMIT}),
        {"name": "claude", "routing": one, "deployments": [
            {"provider": "anthropic", "base_url": raw.url, "model": "claude-up", "api_key": "k",
             "max_response_bytes": LIMIT}]},
    ]})


@pytest.mark.parametrize("reply", [
    Reply(chunks=[BIG]),  # Content-Length over the limit
    Reply(chunks=[BIG[i:i + 1000] for i in range(0, len(BIG), 1000)], stream=True),  # chunked, no length
    Reply(chunks=[gzip.compress(BIG)], headers={"Content-Encoding": "gzip"}),  # small on the wire, big decoded
    Reply(status=500, chunks=[b'{"error": {"message": "' + b"e" * 10_000 + b'"}}']),  # an error body
], ids=["length", "chunked", "gzip", "error-body"])
def test_too_large_whole_reply_is_a_clear_502(limited: RunningGateway, raw: RawUpstream, reply: Reply) -> None:  # noqa: F811
    raw.script.append(reply)
    with pytest.raises(openai.APIStatusError) as e:
        openai.OpenAI(base_url=limited.base_url, api_key="x", max_retries=0).chat.completions.create(
            model="m", messages=MSG)  # type: ignore[arg-type]
    assert e.value.status_code == 502
    assert f"limit of {LIMIT} bytes" in e.value.message and "max_response_bytes" in e.value.message
    limited.settle()
    assert limited.log_rows()[-1]["status"] == 502


def test_too_large_reply_to_an_anthropic_caller(limited: RunningGateway, raw: RawUpstream) -> None:  # noqa: F811
    raw.script.append(Reply(chunks=[b'{"type": "message", "id": "' + b"m" * 10_000 + b'"}']))
    with pytest.raises(anthropic.APIStatusError) as e:
        anthropic.Anthropic(base_url=limited.url, api_key="x", max_retries=0).messages.create(
            model="claude", max_tokens=5, messages=MSG)  # type: ignore[arg-type]
    assert e.value.status_code == 502
    assert "max_response_bytes" in str(e.value) and str(LIMIT) in str(e.value)


def test_replies_within_the_limit_pass(limited: RunningGateway, raw: RawUpstream) -> None:  # noqa: F811
    small = orjson.dumps(COMPLETION)
    assert len(small) < LIMIT
    raw.script.append(Reply(chunks=[small]))
    raw.script.append(Reply(chunks=[small[:50], small[50:]], stream=True))
    raw.script.append(Reply(chunks=[gzip.compress(small)], headers={"Content-Encoding": "gzip"}))
    client = openai.OpenAI(base_url=limited.base_url, api_key="x", max_retries=0)
    for _ in range(3):
        assert client.chat.completions.create(model="m", messages=MSG).choices[0].message.content == "Hello"  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, -1, "lots"])
def test_bad_max_response_bytes_fails_at_start_naming_the_key(value: Any) -> None:
    cfg = {"models": [openai_model("m", "http://127.0.0.1:1", deployment={"max_response_bytes": value})]}
    with pytest.raises(ConfigError, match="max_response_bytes"):
        parse_config(cfg)


def test_max_response_bytes_is_read_and_defaults_to_64_mib() -> None:
    cfg = parse_config({"models": [
        openai_model("m", "http://127.0.0.1:1", deployment={"max_response_bytes": 1024}),
        {"name": "c", "deployments": [{"provider": "anthropic", "model": "c"}]},
    ]})
    assert cfg.models[0].deployments[0].max_response_bytes == 1024  # type: ignore[union-attr]
    assert cfg.models[1].deployments[0].max_response_bytes == 64 * 1024 * 1024  # type: ignore[union-attr]
