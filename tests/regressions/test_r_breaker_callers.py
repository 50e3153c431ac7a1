"""Issue 9, section 3: one tenant's two bad requests opened a shared breaker and blocked another
tenant for 30 s. Failures a caller's own request causes (400/413/422, content filter) never count;
server-side failures open the shared breaker only when at least ``routing.breaker.min_callers`` (2)
distinct callers (virtual keys, or client addresses without one) saw them in the window. A single
caller's failures cool the deployment down for that caller only (a bounded LRU per deployment)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from kaiyuan.routing.breaker import MAX_COOLING_CALLERS, MAX_FAILING_CALLERS, DeploymentHealth
from kaiyuan.routing.settings import BreakerSettings
from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.regressions.budget_kit import MASTER, admin, new_key, oai

MSGS: Any = [{"role": "user", "content": "hello"}]
# the finding's numbers: two bad requests (one attempt each) were enough to open the breaker
STRICT = {"breaker": {"failures": 2, "window_s": 30, "cooldown_s": 30}, "retries": {"max_attempts": 1}}


def _gateway(make_gateway: Callable[[dict[str, Any]], RunningGateway], url: str, **server: Any) -> RunningGateway:
    return make_gateway({"server": server, "models": [{"name": "m", "routing": STRICT, "deployments": [
        {"provider": "openai_compatible", "base_url": url + "/v1", "model": "up", "api_key": "sk-upstream", "id": "d",
         "price": {"input": 0, "output": 0}}]}]})


@pytest.fixture
def gw(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI) -> RunningGateway:
    return _gateway(make_gateway, fake_openai.url, master_key=MASTER)  # type: ignore[attr-defined]


def _state(gw: RunningGateway) -> dict[str, Any]:
    r = admin(gw, "GET", "/admin/deployments")
    assert r.status_code == 200, r.text
    [d] = r.json()["data"]
    return d  # type: ignore[no-any-return]


def test_one_tenants_bad_requests_do_not_block_another(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    a, b = oai(gw, new_key(gw)["key"]), oai(gw, new_key(gw)["key"])
    fake_openai.next(Behaviour(status=500), Behaviour(status=500))  # A's two requests crash the upstream
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            a.chat.completions.create(model="m", messages=MSGS)
    d = _state(gw)
    assert d["state"] == "closed" and d["callers_cooling_down"] == 1
    # B is served at once by the same deployment
    raw = b.chat.completions.with_raw_response.create(model="m", messages=MSGS)
    assert raw.headers["x-kaiyuan-deployment"] == "d" and raw.headers["x-kaiyuan-attempts"] == "1"
    # A itself is cooled down: refused without a request upstream, told why
    sent = len(fake_openai.requests)
    with pytest.raises(openai.APIStatusError) as e:
        a.chat.completions.create(model="m", messages=MSGS)
    assert e.value.status_code == 503 and "for this caller only" in e.value.message
    assert 0 < int(e.value.response.headers["Retry-After"]) <= 30  # when its cool-down ends
    assert len(fake_openai.requests) == sent


def test_a_real_outage_seen_by_two_callers_opens_the_breaker(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    a, b, c = (oai(gw, new_key(gw)["key"]) for _ in range(3))
    fake_openai.default = Behaviour(status=503)
    for _ in range(2):
        with pytest.raises(openai.APIStatusError):
            a.chat.completions.create(model="m", messages=MSGS)
    assert _state(gw)["state"] == "closed"
    with pytest.raises(openai.APIStatusError):  # a second caller fails too: the deployment is down
        b.chat.completions.create(model="m", messages=MSGS)
    d = _state(gw)
    assert d["state"] == "open" and "2 caller(s)" in d["reason"]
    sent = len(fake_openai.requests)
    with pytest.raises(openai.APIStatusError) as e:  # a third caller is not sent to it
        c.chat.completions.create(model="m", messages=MSGS)
    assert e.value.status_code == 503 and "circuit open" in e.value.message
    assert len(fake_openai.requests) == sent


def test_refusals_of_the_request_itself_never_count(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    a, b = oai(gw, new_key(gw)["key"]), oai(gw, new_key(gw)["key"])
    too_long = Behaviour(status=400, error_message="This model's maximum context length is 8192 tokens",
                         error_type="invalid_request_error")
    filtered = Behaviour(status=400, error_message="The response was filtered due to the content filter")
    fake_openai.next(*([too_long] * 3 + [filtered] * 3 + [Behaviour(status=422, error_message="bad")] * 2))
    for c in (a, b, a, b, a, b, a, b):
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model="m", messages=MSGS)
        assert e.value.status_code in (400, 422)
    d = _state(gw)
    assert d["state"] == "closed" and "callers_cooling_down" not in d
    assert b.chat.completions.create(model="m", messages=MSGS).choices[0].message.content == "echo: hello"


def test_without_keys_the_client_address_is_the_caller(make_gateway: Callable[[dict[str, Any]], RunningGateway],
                                                       fake_openai: FakeOpenAI) -> None:
    gw = _gateway(make_gateway, fake_openai.url)  # type: ignore[attr-defined]

    def from_address(ip: str) -> openai.OpenAI:  # loopback answers on all of 127/8: two distinct clients
        transport = httpx.HTTPTransport(local_address=ip)
        return openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0,
                             http_client=httpx.Client(transport=transport))

    one, two = from_address("127.0.0.1"), from_address("127.0.0.2")
    fake_openai.next(Behaviour(status=500), Behaviour(status=500))
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            one.chat.completions.create(model="m", messages=MSGS)
    assert two.chat.completions.create(model="m", messages=MSGS).choices[0].message.content == "echo: hello"
    [d] = gw.gateway.router.describe()
    assert d["state"] == "closed" and d["callers_cooling_down"] == 1


def test_bad_breaker_settings_are_config_errors() -> None:
    from kaiyuan.config import ConfigError, parse_config

    for bad in (0, -1, "two"):
        with pytest.raises(ConfigError) as e:
            parse_config({"models": [{"name": "m", "routing": {"breaker": {"min_callers": bad}}, "deployments": [
                {"provider": "openai_compatible", "base_url": "http://127.0.0.1:9/v1", "model": "x"}]}]})
        assert "min_callers" in str(e.value) and "models" in str(e.value)


# -- the rule itself, on an injected clock ------------------------------------------------------------

def test_caller_state_is_bounded_and_forgets_the_window() -> None:
    t = [0.0]
    h = DeploymentHealth("m", "d", BreakerSettings(failures=2, window_s=10, cooldown_s=5), lambda: t[0])
    h.failure(False, "x", caller="a")
    t[0] = 11.0  # a's failure has left the window: b alone is one caller
    h.failure(False, "x", caller="b")
    h.failure(False, "x", caller="b")
    assert h.state == "closed" and set(h.cooling) == {"b"}
    assert h.cooling_for("b", 15.9) and not h.cooling_for("b", 16.1) and not h.cooling
    for i in range(MAX_COOLING_CALLERS + 50):  # a flood of callers, each failing on its own
        t[0] += 11.0
        h.failure(False, "x", caller=f"k{i}")
        h.failure(False, "x", caller=f"k{i}")
        assert h.state == "closed"
    assert len(h.cooling) <= MAX_COOLING_CALLERS
    assert len(h._failing) <= MAX_FAILING_CALLERS
    # a failure no caller can be blamed for counts as everyone's (the old rule)
    h2 = DeploymentHealth("m", "e", BreakerSettings(failures=2), lambda: t[0])
    h2.failure(False, "x")
    h2.failure(False, "x")
    assert h2.state == "open"
    # min_callers 1: one caller opens it for everyone
    h3 = DeploymentHealth("m", "f", BreakerSettings(failures=2, min_callers=1), lambda: t[0])
    h3.failure(False, "x", caller="a")
    h3.failure(False, "x", caller="a")
    assert h3.state == "open" and not h3.cooling
