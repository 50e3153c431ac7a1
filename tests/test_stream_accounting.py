"""Every stream shape is accounted for the same way: status, tokens in/out, ttft, not cancelled,
and the caller gets the usage chunk only when it asked for it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest

from kaiyuan.testing.harness import RunningGateway
from tests.conftest import openai_model

MSG = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def gw(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: Any, fake_anthropic: Any,
       fake_gemini: Any) -> RunningGateway:
    return make_gateway({"models": [
        openai_model("plain", fake_openai.url, "upstream-chat"),
        {"name": "claude", "deployments": [
            {"provider": "anthropic", "base_url": fake_anthropic.url, "model": "claude-up", "api_key": "sk-ant-upstream"}]},
        {"name": "gemini", "deployments": [
            {"provider": "gemini", "base_url": fake_gemini.url + "/v1beta", "model": "gemini-up", "api_key": "gm-upstream"}]},
    ]})


def _row_ok(gw: RunningGateway) -> dict[str, Any]:
    row = gw.log_rows()[-1]
    assert row["status"] == 200 and row["error"] is None and not row["cancelled"], row
    assert row["prompt_tokens"] and row["completion_tokens"], row
    assert row["ttft_ms"] is not None and row["stream"], row
    return row


@pytest.mark.parametrize("model", ["plain", "claude", "gemini"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_openai_streams(gw: RunningGateway, model: str, include_usage: bool) -> None:
    client = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0)
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(client.chat.completions.create(model=model, messages=MSG, stream=True, **extra))  # type: ignore[arg-type]
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    with_usage = [c for c in chunks if c.usage is not None]
    assert bool(with_usage) == include_usage, [c.usage for c in chunks]
    row = _row_ok(gw)
    if include_usage:
        assert with_usage[-1].usage.prompt_tokens == row["prompt_tokens"]  # type: ignore[union-attr]


@pytest.mark.parametrize("model", ["plain", "claude", "gemini"])
def test_anthropic_streams(gw: RunningGateway, model: str) -> None:
    client = anthropic.Anthropic(base_url=gw.url, api_key="x", max_retries=0)
    with client.messages.stream(model=model, max_tokens=20, messages=MSG) as s:  # type: ignore[arg-type]
        msg = s.get_final_message()
    row = _row_ok(gw)
    assert msg.usage.output_tokens == row["completion_tokens"]
