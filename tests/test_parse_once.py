"""A whole (non-streamed) upstream body is parsed as JSON once on the way through: the executor's
"is it a JSON object, is it an error" check keeps the parsed object (``UpstreamReply.parsed``) and
the usage reading (and the deployment's tpm count) reuse it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import openai
import orjson
import pytest

from kaiyuan.testing.harness import RunningGateway
from tests.conftest import openai_model
from tests.test_upstream_garbage import COMPLETION, RawUpstream, Reply, raw  # noqa: F401  (fixture)

MARK = b"parse-once-marker"


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every orjson.loads of a body that carries MARK."""
    seen: list[bytes] = []
    real = orjson.loads

    def loads(data: Any) -> Any:
        if isinstance(data, bytes | bytearray | memoryview) and MARK in bytes(data):
            seen.append(bytes(data))
        return real(data)

    monkeypatch.setattr(orjson, "loads", loads)
    return seen


@pytest.mark.parametrize("tpm", [None, 1_000_000])
def test_openai_passthrough_body_is_parsed_once(make_gateway: Callable[[dict[str, Any]], RunningGateway],
                                                 raw: RawUpstream, counted: list[bytes], tpm: int | None) -> None:  # noqa: F811
    g = make_gateway({"models": [openai_model("m", raw.url, "up", deployment={"tpm": tpm} if tpm else {})]})
    raw.script.append(Reply(chunks=[orjson.dumps({**COMPLETION, "id": MARK.decode()})]))
    r = openai.OpenAI(base_url=g.base_url, api_key="x", max_retries=0).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}])
    assert r.id == MARK.decode() and r.usage is not None and r.usage.total_tokens == 5
    g.settle()
    row = g.log_rows()[-1]
    assert row["prompt_tokens"] == 3 and row["completion_tokens"] == 2
    assert len(counted) == 1, f"the upstream body was parsed {len(counted)} times"


def test_anthropic_passthrough_body_is_parsed_once(make_gateway: Callable[[dict[str, Any]], RunningGateway],
                                                    raw: RawUpstream, counted: list[bytes]) -> None:  # noqa: F811
    g = make_gateway({"models": [{"name": "claude", "deployments": [
        {"provider": "anthropic", "base_url": raw.url, "model": "claude-up", "api_key": "k"}]}]})
    msg = {"id": MARK.decode(), "type": "message", "role": "assistant", "model": "claude-up",
           "content": [{"type": "text", "text": "Hi"}], "stop_reason": "end_turn", "stop_sequence": None,
           "usage": {"input_tokens": 7, "output_tokens": 4}}
    raw.script.append(Reply(chunks=[orjson.dumps(msg)]))
    r = anthropic.Anthropic(base_url=g.url, api_key="x", max_retries=0).messages.create(
        model="claude", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert r.id == MARK.decode()
    g.settle()
    row = g.log_rows()[-1]
    assert row["prompt_tokens"] == 7 and row["completion_tokens"] == 4
    assert len(counted) == 1, f"the upstream body was parsed {len(counted)} times"
