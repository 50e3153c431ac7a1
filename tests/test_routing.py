"""Routing end to end: the official openai SDK through the gateway to fake upstreams with injected faults."""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from kaiyuan.context import Principal, RequestContext
from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from kaiyuan.testing.server_thread import ServerThread

MSG = [{"role": "user", "content": "hello"}]
MakeGateway = Callable[[dict[str, Any]], RunningGateway]


@pytest.fixture
def fakes(servers: ServerThread) -> Iterator[Callable[[], FakeOpenAI]]:
    made: list[FakeOpenAI] = []

    def make() -> FakeOpenAI:
        f = FakeOpenAI(api_key="sk-upstream", seed=len(made))
        f.url = servers.serve(f.app, handler_cancellation=True)  # type: ignore[attr-defined]
        made.append(f)
        return f

    yield make
    for f in made:
        servers.stop(f.app)


def dep(fake: FakeOpenAI, ident: str, **kw: Any) -> dict[str, Any]:
    return {"provider": "openai_compatible", "base_url": fake.url + "/v1", "model": "up-" + ident,  # type: ignore[attr-defined]
            "api_key": "sk-upstream", "id": ident, **kw}


def client(gw: RunningGateway, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0, default_headers=headers or None)


def chat(c: openai.OpenAI, model: str = "m", **kw: Any) -> tuple[str, dict[str, str]]:
    raw = c.chat.completions.with_raw_response.create(model=model, messages=MSG, **kw)  # type: ignore[call-overload]
    r = raw.parse()
    return r.choices[0].message.content, dict(raw.headers)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def admin(gw: RunningGateway, key: str | None = None) -> dict[str, dict[str, Any]]:
    """/admin/deployments with ``key``; without one (a gateway in open mode, whose admin routes are
    closed) the same rows straight from the router the endpoint serves."""
    if key is None:
        gw.settle()  # as an HTTP round trip would: the handlers of finished requests have ended
        data = gw.gateway.router.describe()
    else:
        status, body = get(gw.url + "/admin/deployments", {"Authorization": f"Bearer {key}"})
        assert status == 200, body
        data = json.loads(body)["data"]
    return {f"{d['model']}/{d['deployment']}": d for d in data}


def seed(gw: RunningGateway, n: int = 1) -> None:
    gw.gateway.router.rng = random.Random(n)


# -- failover, retries, fallbacks ------------------------------------------------------------------

def test_zero_client_failures_while_one_deployment_fails_every_time(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    bad, good = fakes(), fakes()
    bad.default = Behaviour(status=500)
    gw = make_gateway({"models": [{"name": "m", "deployments": [dep(bad, "bad"), dep(good, "good")]}]})
    seed(gw)
    c = client(gw)
    for i in range(30):
        if i % 3 == 0:
            text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(model="m", messages=MSG, stream=True) if ch.choices)
        else:
            text, headers = chat(c)
            assert headers["x-kaiyuan-deployment"] == "good"
        assert text == "echo: hello"
    # After 5 failures "bad" left this caller's rotation: it saw no more than that. All of them came
    # from one caller (this client), so the shared breaker stays closed for others (min_callers 2).
    assert len(bad.requests) == 5
    state = admin(gw)
    assert state["m/bad"]["state"] == "closed" and state["m/bad"]["callers_cooling_down"] == 1
    assert state["m/good"]["state"] == "closed" and "callers_cooling_down" not in state["m/good"]


def test_fallback_model_serves_when_every_deployment_fails(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    down, backup = fakes(), fakes()
    down.default = Behaviour(status=503)
    gw = make_gateway({"models": [
        {"name": "m", "deployments": [dep(down, "d1"), dep(down, "d2")], "routing": {"fallbacks": ["backup"]}},
        {"name": "backup", "deployments": [dep(backup, "b")]},
    ]})
    c = client(gw)
    for _ in range(12):
        text, headers = chat(c)
        assert text == "echo: hello"
        assert headers["x-kaiyuan-deployment"] == "b" and headers["x-kaiyuan-model"] == "backup"
    assert backup.requests[-1]["model"] == "up-b"
    rows = gw.log_rows()
    first = json.loads(rows[0]["attempt_log"])
    # Both deployments, then one retried after a backoff (retries.max_attempts: 3), then the fallback.
    assert [(a["model"], a["status"]) for a in first] == [("m", 503)] * 3 + [("backup", 200)]
    assert {first[0]["deployment"], first[1]["deployment"]} == {"d1", "d2"} and first[3]["deployment"] == "b"
    assert rows[0]["attempts"] == 4 and rows[0]["status"] == 200
    # Once both breakers are open, the fallback answers at the first attempt.
    assert rows[-1]["attempts"] == 1


def test_zero_client_failures_with_a_deployment_failing_30_percent(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    flaky, steady = fakes(), fakes()
    flaky.default = Behaviour(fail_rate=0.3, status_on_fail=500)
    # A breaker that never opens keeps the flaky deployment in rotation, so every request is at risk.
    routing = {"breaker": {"enabled": False}}
    gw = make_gateway({"models": [{"name": "m", "deployments": [dep(flaky, "flaky"), dep(steady, "steady")], "routing": routing}]})
    seed(gw, 3)
    c = client(gw)
    attempts = []
    for _ in range(60):
        text, headers = chat(c)
        assert text == "echo: hello"
        attempts.append(int(headers["x-kaiyuan-attempts"]))
    assert max(attempts) == 2 and attempts.count(2) >= 3  # failures happened and were absorbed
    assert len(flaky.requests) >= 20


def test_single_flaky_deployment_is_retried_with_backoff(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    flaky = fakes()
    flaky.default = Behaviour(fail_rate=0.3, status_on_fail=503)
    routing = {"breaker": {"enabled": False}, "retries": {"max_attempts": 6, "backoff_base_s": 0.001, "backoff_max_s": 0.01}}
    gw = make_gateway({"models": [{"name": "m", "deployments": [dep(flaky, "only")], "routing": routing}]})
    c = client(gw)
    results = [chat(c) for _ in range(40)]
    assert all(t == "echo: hello" for t, _ in results)
    assert len(flaky.requests) > 40  # some were retried on the same deployment


def test_retry_after_takes_a_deployment_out_of_rotation(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    limited, other = fakes(), fakes()
    limited.next(Behaviour(status=429, headers={"Retry-After": "30"}))
    gw = make_gateway({"models": [{"name": "m", "routing": {"strategy": "cheapest"}, "deployments": [
        dep(limited, "limited", price={"input": 0.1, "output": 0.2}), dep(other, "other", price={"input": 1, "output": 2})]}]})
    c = client(gw)
    _, headers = chat(c)
    assert headers["x-kaiyuan-deployment"] == "other" and headers["x-kaiyuan-attempts"] == "2"
    for _ in range(5):  # the cheaper one is cooling down for 30 s: not even tried
        _, headers = chat(c)
        assert headers["x-kaiyuan-deployment"] == "other" and headers["x-kaiyuan-attempts"] == "1"
    assert len(limited.requests) == 1
    d = admin(gw)["m/limited"]
    assert d["state"] == "closed" and d["cooling_down_s"] > 0 and "Retry-After 30s" in d["cooldown_reason"]
    # After the Retry-After window (clock injected), it is the first choice again.
    now = gw.gateway.router.now()
    gw.gateway.router.set_clock(lambda: now + 31)
    _, headers = chat(c)
    assert headers["x-kaiyuan-deployment"] == "limited"


def test_short_retry_after_on_the_only_deployment_is_waited_for(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    only = fakes()
    only.next(Behaviour(status=429, headers={"Retry-After": "0.05"}))
    gw = make_gateway({"models": [{"name": "m", "deployments": [dep(only, "only")]}]})
    text, headers = chat(client(gw))
    assert text == "echo: hello" and headers["x-kaiyuan-attempts"] == "2"
    # A Retry-After longer than retries.max_retry_after_s is not waited for: the caller gets the 429.
    only.next(Behaviour(status=429, headers={"Retry-After": "120"}))
    with pytest.raises(openai.RateLimitError) as ei:
        chat(client(gw))
    assert ei.value.response.headers["retry-after"] == "120"
    assert "all 1 attempt(s) failed" in ei.value.message


def test_attempts_are_bounded(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    down = fakes()
    down.default = Behaviour(status=502)
    routing = {"breaker": {"enabled": False}, "retries": {"max_attempts": 4, "backoff_base_s": 0.001, "backoff_max_s": 0.002}}
    gw = make_gateway({"models": [{"name": "m", "deployments": [dep(down, "a"), dep(down, "b")], "routing": routing}]})
    with pytest.raises(openai.APIStatusError) as ei:
        chat(client(gw))
    assert ei.value.status_code == 502 and ei.value.response.headers["x-kaiyuan-attempts"] == "4"
    assert len(down.requests) == 4
    assert "all 4 attempt(s) failed" in ei.value.message


def test_client_errors_are_not_retried(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    a, b = fakes(), fakes()
    for f in (a, b):
        f.default = Behaviour(status=400, error_message="Invalid 'temperature': must be <= 2")
    gw = make_gateway({"models": [{"name": "m", "deployments": [dep(a, "a"), dep(b, "b")], "routing": {"fallbacks": ["n"]}},
                                  {"name": "n", "deployments": [dep(b, "nb")]}]})
    with pytest.raises(openai.BadRequestError) as ei:
        chat(client(gw))
    assert "temperature" in ei.value.message and ei.value.response.headers["x-kaiyuan-attempts"] == "1"
    assert len(a.requests) + len(b.requests) == 1


def test_context_window_and_content_policy_fallbacks(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    small, big, lenient, generic = fakes(), fakes(), fakes(), fakes()
    gw = make_gateway({"models": [
        {"name": "m", "deployments": [dep(small, "small")], "routing": {
            "fallbacks": ["generic"], "context_window_fallbacks": ["big"], "content_policy_fallbacks": ["lenient"]}},
        {"name": "big", "deployments": [dep(big, "big")]},
        {"name": "lenient", "deployments": [dep(lenient, "lenient")]},
        {"name": "generic", "deployments": [dep(generic, "generic")]},
        {"name": "plain", "deployments": [dep(small, "plain")]},
    ]})
    c = client(gw)
    small.next(Behaviour(status=400, error_message="This model's maximum context length is 8192 tokens.", error_type="invalid_request_error"))
    _, headers = chat(c)
    assert headers["x-kaiyuan-model"] == "big"
    small.next(Behaviour(status=400, raw_body=json.dumps({"error": {
        "message": "rejected", "type": "invalid_request_error", "code": "content_policy_violation"}}).encode()))
    _, headers = chat(c)
    assert headers["x-kaiyuan-model"] == "lenient"
    assert generic.requests == []  # refusals do not go to the generic fallbacks
    # A model without a context-window list returns the upstream's 400 as is.
    small.next(Behaviour(status=400, error_message="This model's maximum context length is 8192 tokens."))
    with pytest.raises(openai.BadRequestError) as ei:
        chat(c, model="plain")
    assert "maximum context length" in ei.value.message


# -- streams and timeouts ------------------------------------------------------------------------

def test_stream_that_stalls_before_its_first_byte_is_retried_elsewhere(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    stall, good = fakes(), fakes()
    stall.default = Behaviour(stall_after_chunks=0)
    gw = make_gateway({"models": [{"name": "m", "routing": {"strategy": "cheapest"}, "deployments": [
        dep(stall, "stall", price={"input": 0, "output": 0}, timeouts={"idle": 0.2}),
        dep(good, "good", price={"input": 1, "output": 1})]}]})
    raw = client(gw).chat.completions.with_raw_response.create(model="m", messages=MSG, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices)
    assert text == "echo: hello"
    assert raw.headers["x-kaiyuan-deployment"] == "good" and raw.headers["x-kaiyuan-attempts"] == "2"
    log = json.loads(gw.log_rows()[-1]["attempt_log"])
    assert log[0]["deployment"] == "stall" and "timeouts.idle" in log[0]["error"]


def test_stream_broken_after_first_byte_is_not_retried(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    drop, good = fakes(), fakes()
    drop.default = Behaviour(drop_after_chunks=2)
    gw = make_gateway({"models": [{"name": "m", "routing": {"strategy": "cheapest"}, "deployments": [
        dep(drop, "drop", price={"input": 0, "output": 0}), dep(good, "good", price={"input": 1, "output": 1})]}]})
    with pytest.raises(openai.APIError) as ei:
        for _ in client(gw).chat.completions.create(model="m", messages=MSG, stream=True):
            pass
    assert "drop" in str(ei.value.message)
    assert good.requests == []  # part of the answer had reached the client: never retried
    rows = gw.log_rows()
    assert rows[-1]["status"] == 502 and rows[-1]["attempts"] == 1


def test_first_byte_timeout_gives_504(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    slow = fakes()
    slow.default = Behaviour(delay_first_byte=5)
    gw = make_gateway({"models": [{"name": "m", "routing": {"retries": {"max_attempts": 1}},
                                   "deployments": [dep(slow, "slow", timeouts={"first_byte": 0.2})]}]})
    with pytest.raises(openai.APIStatusError) as ei:
        chat(client(gw))
    assert ei.value.status_code == 504 and "timeouts.first_byte" in ei.value.message


def test_idle_timeout_mid_stream_ends_with_an_error_event(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    stall = fakes()
    stall.default = Behaviour(stall_after_chunks=2)
    gw = make_gateway({"models": [{"name": "m", "deployments": [dep(stall, "stall", timeouts={"idle": 0.2})]}]})
    seen = []
    with pytest.raises(openai.APIError) as ei:
        for ch in client(gw).chat.completions.create(model="m", messages=MSG, stream=True):
            seen.append(ch)
    assert seen and "timeouts.idle" in str(ei.value.message)
    assert gw.log_rows()[-1]["status"] == 504


def test_total_request_budget_bounds_attempts(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    slow = fakes()
    slow.default = Behaviour(delay_first_byte=5)
    gw = make_gateway({"models": [{"name": "m", "routing": {"retries": {"max_attempts": 5, "max_total_s": 0.3}},
                                   "deployments": [dep(slow, "a"), dep(slow, "b")]}]})
    with pytest.raises(openai.APIStatusError) as ei:
        chat(client(gw))
    assert ei.value.status_code == 504 and "max_total_s" in ei.value.message
    assert int(ei.value.response.headers["x-kaiyuan-attempts"]) < 5


# -- breaker -----------------------------------------------------------------------------------------

def test_breaker_opens_then_half_open_probe_closes_it(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    primary, spare = fakes(), fakes()
    primary.default = Behaviour(status=500)
    breaker = {"failures": 3, "window_s": 10, "cooldown_s": 5, "half_open_probes": 2, "min_callers": 1}
    gw = make_gateway({"models": [{"name": "m", "routing": {"strategy": "cheapest", "breaker": breaker}, "deployments": [
        dep(primary, "primary", price={"input": 0.1, "output": 0.1}), dep(spare, "spare", price={"input": 1, "output": 1})]}]})
    t = [1000.0]
    gw.gateway.router.set_clock(lambda: t[0])
    c = client(gw)
    for _ in range(3):
        _, headers = chat(c)
        assert headers["x-kaiyuan-attempts"] == "2"
    assert admin(gw)["m/primary"]["state"] == "open"
    _, headers = chat(c)
    assert headers["x-kaiyuan-attempts"] == "1" and headers["x-kaiyuan-deployment"] == "spare"
    assert len(primary.requests) == 3
    t[0] += 4.9  # still cooling down
    chat(c)
    assert len(primary.requests) == 3
    t[0] += 0.2  # cooldown over: the next request probes it, and the probe fails -> open again
    _, headers = chat(c)
    assert headers["x-kaiyuan-attempts"] == "2" and len(primary.requests) == 4
    d = admin(gw)["m/primary"]
    assert d["state"] == "open" and "probe failed" in d["reason"]
    primary.default = Behaviour()  # it recovers
    t[0] += 5.1
    _, headers = chat(c)
    assert headers["x-kaiyuan-deployment"] == "primary"
    assert admin(gw)["m/primary"]["state"] == "half_open"  # one good probe of the two required
    _, headers = chat(c)
    assert headers["x-kaiyuan-deployment"] == "primary"
    d = admin(gw)["m/primary"]
    assert d["state"] == "closed" and "2 probe(s) succeeded" in d["reason"]
    metrics = get(gw.url + "/metrics")[1].decode()
    for frm, to, n in (("closed", "open", 1), ("open", "half_open", 2), ("half_open", "open", 1), ("half_open", "closed", 1)):
        assert f'kaiyuan_deployment_state_changes_total{{deployment="primary",from_state="{frm}",model="m",to_state="{to}"}} {n}.0' in metrics


def test_failures_outside_the_window_do_not_open_the_breaker(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    a, b = fakes(), fakes()
    a.default = Behaviour(status=500)
    gw = make_gateway({"models": [{"name": "m", "routing": {"strategy": "cheapest", "breaker": {"failures": 2, "window_s": 10, "min_callers": 1}},
                                   "deployments": [dep(a, "a", price={"input": 0, "output": 0}), dep(b, "b", price={"input": 1, "output": 1})]}]})
    t = [0.0]
    gw.gateway.router.set_clock(lambda: t[0])
    chat(client(gw))
    t[0] += 11
    chat(client(gw))
    assert admin(gw)["m/a"]["state"] == "closed"
    chat(client(gw))
    assert admin(gw)["m/a"]["state"] == "open"


def test_all_breakers_open_gives_a_503_that_says_why(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    a = fakes()
    a.default = Behaviour(status=500)
    gw = make_gateway({"models": [{"name": "m", "routing": {"breaker": {"failures": 1, "min_callers": 1}, "retries": {"max_attempts": 1}},
                                   "deployments": [dep(a, "a")]}]})
    with pytest.raises(openai.InternalServerError):
        chat(client(gw))
    with pytest.raises(openai.APIStatusError) as ei:
        chat(client(gw))
    assert ei.value.status_code == 503 and "circuit open" in ei.value.message and "m/a" in ei.value.message
    assert len(a.requests) == 1


def test_admin_endpoint_requires_the_master_key(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    f = fakes()
    gw = make_gateway({"server": {"master_key": "sk-master"}, "models": [{"name": "m", "deployments": [
        dep(f, "a", tags=["self_hosted"], weight=2, price={"input": 0.5, "output": 1})]}]})
    assert get(gw.url + "/admin/deployments")[0] == 401
    status, body = get(gw.url + "/admin/deployments", {"Authorization": "Bearer wrong"})
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    d = admin(gw, "sk-master")["m/a"]
    assert d["state"] == "closed" and d["tags"] == ["self_hosted"] and d["weight"] == 2
    assert d["price"] == {"input": 0.5, "output": 1.0, "currency": "USD"}
    status, body = get(gw.url + "/admin/deployments?model=nope", {"Authorization": "Bearer sk-master"})
    assert json.loads(body)["data"] == []


# -- data policy ------------------------------------------------------------------------------------

def _policy_gateway(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> tuple[RunningGateway, FakeOpenAI, FakeOpenAI, FakeOpenAI]:
    own, oai, eu = fakes(), fakes(), fakes()
    gw = make_gateway({"models": [{"name": "m", "deployments": [
        dep(own, "own", tags=["self_hosted", "region:de"]),
        dep(oai, "oai", tags=["vendor:openai", "region:us"]),
        dep(eu, "eu", tags=["vendor:mistral", "region:fr"]),
    ]}]})
    seed(gw, 5)
    return gw, own, oai, eu


def test_policy_header_keeps_requests_on_allowed_deployments(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    gw, _own, oai, _eu = _policy_gateway(make_gateway, fakes)
    c = client(gw, **{"x-kaiyuan-policy": "self_hosted"})
    for _ in range(8):
        _, headers = chat(c)
        assert headers["x-kaiyuan-deployment"] == "own"
    c2 = client(gw, **{"x-kaiyuan-policy": "!vendor:openai"})
    served = {chat(c2)[1]["x-kaiyuan-deployment"] for _ in range(16)}
    assert served == {"own", "eu"}
    c3 = client(gw, **{"x-kaiyuan-policy": "region:fr|region:de, !self_hosted"})
    assert {chat(c3)[1]["x-kaiyuan-deployment"] for _ in range(5)} == {"eu"}
    assert oai.requests == []
    assert gw.log_rows()[-1]["policy"] == "region:fr|region:de, !self_hosted"


def test_policy_refusal_is_a_503_naming_the_policy_and_is_logged(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    gw, own, oai, eu = _policy_gateway(make_gateway, fakes)
    own.default = Behaviour(status=500)
    c = client(gw, **{"x-kaiyuan-policy": "self_hosted"})
    with pytest.raises(openai.APIStatusError) as ei:  # the allowed deployment failed: never another one
        chat(c)
    assert ei.value.status_code == 503 and ei.value.body["code"] == "policy_unsatisfied"  # type: ignore[index]
    assert "data policy 'self_hosted' could answer" in ei.value.message and "returned 500" in ei.value.message
    assert int(ei.value.response.headers["x-kaiyuan-attempts"]) == 3
    for _ in range(6):  # this caller's cool-down starts; then nothing allowed is usable and nothing is tried
        try:
            chat(c)
        except openai.APIStatusError as e:
            last = e
    assert last.status_code == 503 and "x-kaiyuan-attempts" not in last.response.headers  # nothing was tried
    assert "data policy 'self_hosted'" in last.message and "not sent elsewhere" in last.message
    assert "for this caller only" in last.message and "oai (fails self_hosted)" in last.message
    assert last.body["code"] == "policy_unsatisfied"  # type: ignore[index]
    assert oai.requests == [] and eu.requests == []
    row = gw.log_rows()[-1]
    assert row["status"] == 503 and row["policy"] == "self_hosted" and "data policy" in row["error"]
    # Without the header the same model still serves from the others.
    assert chat(client(gw))[1]["x-kaiyuan-deployment"] in {"oai", "eu"}


def test_policy_unknown_tag_and_bad_syntax(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    gw, *_ = _policy_gateway(make_gateway, fakes)
    with pytest.raises(openai.APIStatusError) as ei:
        chat(client(gw, **{"x-kaiyuan-policy": "region:jp"}))
    # no deployment carries the tag: refused at authorize (403), not tried (see test_r_policy_authorize)
    assert ei.value.status_code == 403 and "region:jp" in ei.value.message
    assert ei.value.body["code"] == "policy_unsatisfied"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as ei2:
        chat(client(gw, **{"x-kaiyuan-policy": "self hosted!"}))
    assert "x-kaiyuan-policy" in ei2.value.message and ei2.value.body["code"] == "invalid_policy"  # type: ignore[index]


def _key_with_policy(policy: str | None) -> Any:
    """Authentication as for a virtual key that carries ``policy`` (and a cost a hook priced)."""

    async def authenticate(ctx: RequestContext) -> None:
        ctx.principal = Principal(policy=policy)
        ctx.cost_usd = 0.00125

    return authenticate


def test_key_policy_combines_with_the_header(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    gw, _own, oai, _eu = _policy_gateway(make_gateway, fakes)
    gw.gateway.auth.authenticate = _key_with_policy("!vendor:openai")  # type: ignore[method-assign]
    with pytest.raises(openai.APIStatusError) as ei:
        chat(client(gw, **{"x-kaiyuan-policy": "region:us"}))  # only oai is in the US: refused
    assert ei.value.status_code == 403 and "!vendor:openai,region:us" in ei.value.message
    served = set()
    for _ in range(12):
        _, headers = chat(client(gw))
        served.add(headers["x-kaiyuan-deployment"])
        assert headers["x-kaiyuan-cost"] == "0.00125"
    assert served == {"own", "eu"} and oai.requests == []


def test_model_policy_and_fallbacks_respect_the_request_policy(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    own, cloud, fb_cloud, fb_own = fakes(), fakes(), fakes(), fakes()
    own.default = Behaviour(status=503)
    gw = make_gateway({"models": [
        {"name": "m", "routing": {"fallbacks": ["cloudy", "local"]}, "deployments": [
            dep(own, "own", tags=["self_hosted"]), dep(cloud, "cloud", tags=["vendor:x"])]},
        {"name": "cloudy", "deployments": [dep(fb_cloud, "fbc", tags=["vendor:y"])]},
        {"name": "local", "routing": {"policy": "self_hosted"}, "deployments": [
            dep(fb_own, "fbo", tags=["self_hosted"]), dep(fb_cloud, "never", tags=["vendor:y"])]},
    ]})
    _, headers = chat(client(gw, **{"x-kaiyuan-policy": "self_hosted"}))
    assert headers["x-kaiyuan-deployment"] == "fbo" and headers["x-kaiyuan-model"] == "local"
    assert cloud.requests == [] and fb_cloud.requests == []
    for _ in range(6):  # the model-level policy of "local" holds whoever calls it
        assert chat(client(gw), model="local")[1]["x-kaiyuan-deployment"] == "fbo"


# -- strategies, end to end (small samples; the planner tests cover the statistics) ----------------------

def test_weights_respected_end_to_end(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    a, b = fakes(), fakes()
    gw = make_gateway({"models": [{"name": "m", "deployments": [dep(a, "a", weight=4), dep(b, "b", weight=1)]}]})
    seed(gw, 11)
    c = client(gw)
    for _ in range(60):
        chat(c)
    share = len(a.requests) / 60
    assert 0.6 <= share <= 0.95, share


def test_cheapest_first_and_lowest_latency(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    a, b, slow, fast = fakes(), fakes(), fakes(), fakes()
    slow.default = Behaviour(delay_first_byte=0.4)
    gw = make_gateway({"models": [
        {"name": "cheap", "routing": {"strategy": "cheapest"}, "deployments": [
            dep(a, "pricey", price={"input": 2, "output": 8}), dep(b, "budget", price={"input": 0.27, "output": 1.1})]},
        {"name": "quick", "routing": {"strategy": "lowest_latency"}, "deployments": [dep(slow, "slow"), dep(fast, "fast")]},
    ]})
    c = client(gw)
    assert {chat(c, "cheap")[1]["x-kaiyuan-deployment"] for _ in range(5)} == {"budget"}
    served = [chat(c, "quick")[1]["x-kaiyuan-deployment"] for _ in range(8)]
    assert set(served[:2]) == {"slow", "fast"}  # each measured once first
    assert served[2:].count("fast") >= 5  # (one slow outlier on a loaded machine may let "slow" in once)


def test_total_timeout_ends_a_slow_stream_with_an_error_event(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    slow = fakes()
    slow.default = Behaviour(chunk_delay=0.15)
    gw = make_gateway({"models": [{"name": "m", "deployments": [dep(slow, "slow", timeouts={"total": 0.3, "idle": 5})]}]})
    with pytest.raises(openai.APIError) as ei:
        for _ in client(gw).chat.completions.create(model="m", messages=[{"role": "user", "content": "a b c d e f"}], stream=True):
            pass
    assert "total time limit" in str(ei.value.message)
    assert gw.log_rows()[-1]["status"] == 504


def test_a_model_in_both_lists_is_still_tried_for_a_refusal(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    down, small, big = fakes(), fakes(), fakes()
    down.default = Behaviour(status=503)
    small.default = Behaviour(status=400, error_message="This model's maximum context length is 8192 tokens.")
    gw = make_gateway({"models": [
        {"name": "m", "deployments": [dep(down, "down")], "routing": {"fallbacks": ["mid", "big"]}},
        {"name": "mid", "deployments": [dep(small, "small")], "routing": {"context_window_fallbacks": ["big"]}},
        {"name": "big", "deployments": [dep(big, "big")]},
    ]})
    assert chat(client(gw))[1]["x-kaiyuan-model"] == "big"
    log = json.loads(gw.log_rows()[-1]["attempt_log"])
    assert [a["model"] for a in log] == ["m", "m", "m", "mid", "big"]


def test_in_flight_and_rpm_limits(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    a, b = fakes(), fakes()
    gw = make_gateway({"models": [{"name": "m", "routing": {"strategy": "cheapest"}, "deployments": [
        dep(a, "a", rpm=3, tpm=10_000, price={"input": 0, "output": 0}), dep(b, "b", price={"input": 1, "output": 1})]}]})
    gw.gateway.router.set_clock(lambda: 60.0)  # one fixed minute
    c = client(gw)
    served = [chat(c)[1]["x-kaiyuan-deployment"] for _ in range(5)]
    assert served == ["a", "a", "a", "b", "b"]  # a's rpm is spent for this minute
    for _ in range(2):  # streams release their in-flight slot when they end
        list(c.chat.completions.create(model="m", messages=MSG, stream=True))
    d = admin(gw)
    assert d["m/a"]["in_flight"] == 0 and d["m/b"]["in_flight"] == 0
    assert d["m/a"]["capacity"] == "at its rpm limit (3)"


def test_a_slow_first_byte_is_governed_by_first_byte_not_idle(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    slow = fakes()
    slow.default = Behaviour(delay_first_byte=0.8)
    gw = make_gateway({"models": [{"name": "m", "routing": {"retries": {"max_attempts": 1}},
                                   "deployments": [dep(slow, "slow", timeouts={"first_byte": 10, "idle": 0.4})]}]})
    assert chat(client(gw))[0] == "echo: hello"
    text = "".join(ch.choices[0].delta.content or "" for ch in client(gw).chat.completions.create(
        model="m", messages=MSG, stream=True) if ch.choices)
    assert text == "echo: hello"


def test_connect_timeout_fails_over(make_gateway: MakeGateway, fakes: Callable[[], FakeOpenAI]) -> None:
    import socket

    srv = socket.socket()  # listens, never accepts; its backlog is full, so new connects hang
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(c)
    good = fakes()
    try:
        gw = make_gateway({"models": [{"name": "m", "routing": {"strategy": "cheapest"}, "deployments": [
            {**dep(good, "hung", price={"input": 0, "output": 0}, timeouts={"connect": 0.2}), "base_url": f"http://127.0.0.1:{port}/v1"},
            dep(good, "good", price={"input": 1, "output": 1})]}]})
        _, headers = chat(client(gw))
        assert headers["x-kaiyuan-deployment"] == "good" and headers["x-kaiyuan-attempts"] == "2"
        log = json.loads(gw.log_rows()[-1]["attempt_log"])
        assert log[0]["deployment"] == "hung" and "timeouts.connect" in log[0]["error"] and log[0]["status"] == 504
    finally:
        for c in fillers:
            c.close()
        srv.close()
