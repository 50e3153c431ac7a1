"""OpenTelemetry spans for each request and each upstream attempt."""

from __future__ import annotations

import openai
import pytest

from kaiyuan.config import ConfigError, parse_config
from tests.conftest import openai_model


def test_spans_per_request_and_attempt(make_gateway, fake_openai) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway({"tracing": {"enabled": True, "exporter": "memory"}, "models": [openai_model("m", fake_openai.url)]})
    c = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0)
    c.chat.completions.create(model="m", messages=[{"role": "user", "content": "trace me"}])
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    spans = gw.gateway.tracer.memory.get_finished_spans()
    req = [s for s in spans if s.name == "kaiyuan.request"]
    att = [s for s in spans if s.name == "kaiyuan.upstream_attempt"]
    assert len(req) == 2 and len(att) == 1
    ok = next(s for s in req if s.attributes["gen_ai.request.model"] == "m")
    assert ok.attributes["gen_ai.usage.input_tokens"] > 0 and ok.attributes["http.response.status_code"] == 200
    assert att[0].parent.span_id == ok.context.span_id
    bad = next(s for s in req if s.attributes["gen_ai.request.model"] == "missing")
    assert bad.status.is_ok is False


def test_unknown_exporter_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"tracing\.exporter"):
        parse_config({"tracing": {"enabled": True, "exporter": "zipkin"}})
