"""``max_response_bytes``: a whole upstream answer larger than the deployment's limit is a clear 502
naming the limit and the key, whatever way it arrives (with a Content-Length, chunked, or
compressed small and large once decompressed). An error body past the limit (``max_error_bytes``,
at most ``max_response_bytes``) is cut instead: the caller keeps the upstream's status."""

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
], ids=["length", "chunked", "gzip"])
def test_too_large_whole_reply_is_a_clear_502(limited: RunningGateway, raw: RawUpstream, reply: Reply) -> None:  # noqa: F811
    raw.script.append(reply)
    with pytest.raises(openai.APIStatusError) as e:
        openai.OpenAI(base_url=limited.base_url, api_key="x", max_retries=0).chat.completions.create(
            model="m", messages=MSG)  # type: ignore[arg-type]
    assert e.value.status_code == 502
    assert f"limit of {LIMIT} bytes" in e.value.message and "max_response_bytes" in e.value.message
    limited.settle()
    assert limited.log_rows()[-1]["status"] == 502


@pytest.mark.parametrize("reply", [
    Reply(status=429, chunks=[b'{"error": {"message": "slow down ' + b"e" * 10_000 + b'"}}'], headers={"Retry-After": "7"}),
    Reply(status=429, chunks=[gzip.compress(b'{"error": {"message": "slow down ' + b"e" * 10_000 + b'"}}')],
          headers={"Retry-After": "7", "Content-Encoding": "gzip"}),
], ids=["length", "gzip"])
def test_a_long_error_body_is_cut_and_keeps_its_status(limited: RunningGateway, raw: RawUpstream, reply: Reply) -> None:  # noqa: F811
    """An error body past the limit is cut (its connection closed, not drained), not a 502: the
    caller still gets the upstream's status, Retry-After and the start of its message."""
    raw.script.append(reply)
    with pytest.raises(openai.RateLimitError) as e:
        openai.OpenAI(base_url=limited.base_url, api_key="x", max_retries=0).chat.completions.create(
            model="m", messages=MSG)  # type: ignore[arg-type]
    assert e.value.response.headers["retry-after"] == "7"
    assert "slow down" in e.value.message and f"error body cut at {LIMIT} bytes: max_error_bytes" in e.value.message
    assert len(e.value.message) < LIMIT


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
@pytest.mark.parametrize("key", ["max_response_bytes", "max_error_bytes"])
def test_bad_max_response_bytes_fails_at_start_naming_the_key(value: Any, key: str) -> None:
    cfg = {"models": [openai_model("m", "http://127.0.0.1:1", deployment={key: value})]}
    with pytest.raises(ConfigError, match=key):
        parse_config(cfg)


def test_max_response_bytes_is_read_and_defaults_to_64_mib() -> None:
    cfg = parse_config({"models": [
        openai_model("m", "http://127.0.0.1:1", deployment={"max_response_bytes": 1024}),
        {"name": "c", "deployments": [{"provider": "anthropic", "model": "c"}]},
    ]})
    assert cfg.models[0].deployments[0].max_response_bytes == 1024  # type: ignore[union-attr]
    assert cfg.models[1].deployments[0].max_response_bytes == 64 * 1024 * 1024  # type: ignore[union-attr]
    assert cfg.models[1].deployments[0].max_error_bytes == 1024 * 1024  # type: ignore[union-attr]
