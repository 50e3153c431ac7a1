"""Regressions (issue 9, section 4): no secret leaves the gateway.

- Upstream error bodies that echo the vendor key reached callers, the request log and spans (5 of
  5 cases): the configured key and common key shapes are scrubbed (kaiyuan.redact) from errors to
  the caller (whole-body and mid-stream), request-log rows, spans and log lines.
- Credentials in ``base_url`` (``user:pass@``, a token in the query) appeared in error messages,
  deployment ids, the ``x-kaiyuan-deployment`` header and ``/metrics``: they are never displayed,
  and still work for the upstream call (Basic auth header, query kept).
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import aiohttp
import openai
import pytest

from kaiyuan.redact import scrub
from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.conftest import openai_model

KEY = "sk-upstream"  # the fake upstream's key (tests/conftest.py)
SHAPED = "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx0123456789"


def everything_stored(gw: RunningGateway) -> str:
    rows = gw.log_rows()
    spans = gw.gateway.tracer.memory.get_finished_spans() if gw.gateway.tracer else []
    span_text = " ".join(f"{s.attributes} {s.status.description}" for s in spans)
    return repr(rows) + span_text


@pytest.fixture
def gw(make_gateway: Any, fake_openai: FakeOpenAI) -> RunningGateway:
    return make_gateway({"tracing": {"enabled": True, "exporter": "memory"},
                         "models": [openai_model("m", fake_openai.url, routing={"retries": {"max_attempts": 1}})]})


@pytest.mark.parametrize("status", [400, 401, 429, 500, 503])
def test_upstream_error_echoing_the_key_is_scrubbed(gw: RunningGateway, fake_openai: FakeOpenAI, status: int,
                                                    caplog: Any) -> None:
    fake_openai.default = Behaviour(status=status, echo_key=True, error_message=f"bad things; also saw {SHAPED}")
    client = openai.OpenAI(base_url=gw.base_url, api_key="none", max_retries=0)
    with caplog.at_level(logging.DEBUG), pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    shown = str(e.value) + e.value.response.text
    assert "Authorization: Bearer [REDACTED]" in shown  # the upstream's message is kept, the key is not
    stored = everything_stored(gw)
    for leak in (KEY, SHAPED):
        assert leak not in shown and leak not in stored and leak not in caplog.text
    assert "[REDACTED]" in stored


def test_mid_stream_error_event_echoing_the_key_is_scrubbed(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    fake_openai.default = Behaviour(error_event_after_chunks=1, echo_key=True)
    client = openai.OpenAI(base_url=gw.base_url, api_key="none", max_retries=0)
    seen: list[str] = []
    with pytest.raises(openai.APIError) as e:
        for chunk in client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True):
            seen.append(chunk.model_dump_json())
    shown = str(e.value) + repr(getattr(e.value, "body", "")) + "".join(seen)
    assert KEY not in shown and "[REDACTED]" in shown
    assert KEY not in everything_stored(gw)


async def test_base_url_credentials_are_never_shown(make_gateway: Any, fake_openai: FakeOpenAI) -> None:
    host = fake_openai.url.removeprefix("http://")
    url = f"http://kaiyuan-user:s3cret-pass-word@{host}/v1?token=query-secret-123&region=eu"
    bad = "http://other-user:0ther-pass-word@127.0.0.1:9/v1?key=query-secret-456"
    gw = make_gateway({"models": [
        {"name": "m", "deployments": [{"provider": "openai_compatible", "base_url": url, "model": "m"}]},
        {"name": "down", "deployments": [{"provider": "openai_compatible", "base_url": bad, "model": "m"}],
         "routing": {"retries": {"max_attempts": 1}}},
    ]})
    secrets = ("kaiyuan-user", "s3cret-pass-word", "query-secret-123", "other-user", "0ther-pass-word", "query-secret-456")
    fake_openai.api_key = None
    async with aiohttp.ClientSession() as s:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        async with s.post(gw.base_url + "/chat/completions", json=body) as r:
            assert r.status == 200
            shown = repr(dict(r.headers)) + await r.text()
        async with s.post(gw.base_url + "/chat/completions", json={**body, "model": "down"}) as r:
            assert r.status >= 500
            shown += repr(dict(r.headers)) + await r.text()
        async with s.get(gw.url + "/metrics") as r:
            shown += await r.text()
        async with s.get(gw.base_url + "/models") as r:
            shown += await r.text()
        async with s.get(gw.url + "/admin/deployments") as r:
            shown += await r.text()
    shown += everything_stored(gw) + repr([p.id for ps in gw.gateway.providers.values() for p in ps])
    for secret in secrets:
        assert secret not in shown, secret
    assert f"openai_compatible:m@{host}" in shown  # the deployment id names the host, nothing more
    # the credentials still reach the upstream, as HTTP Basic auth and the query
    sent = fake_openai.headers[-1]
    assert sent["Authorization"] == "Basic " + base64.b64encode(b"kaiyuan-user:s3cret-pass-word").decode()


def test_scrub_knows_common_key_shapes() -> None:
    samples = ["sk-ant-api03-" + "a" * 40, "AIzaSyA" + "b" * 32, "AKIA" + "C" * 16, "ghp_" + "d" * 36,
               "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.sig", "Bearer abcdefgh12345"]
    for s in samples:
        assert s.split()[-1] not in scrub(f"error: {s} was refused"), s
    assert scrub("https://u:p4ssw0rd@h/v1?api_key=zz&x=1") == "https://[REDACTED]@h/v1?api_key=[REDACTED]&x=1"
    for plain in ("model gpt-4o-mini does not exist", "deepseek-chat: 429 rate limited", "max_tokens must be >= 1"):
        assert scrub(plain) == plain
