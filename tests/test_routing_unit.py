"""Routing without HTTP: config validation, the planner's statistics, breaker and retry rules,
and a property test that no request ever reaches a deployment its data policy forbids."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from email.utils import formatdate
from typing import Any

import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from kaiyuan.config import ConfigError, GatewayConfig, parse_config
from kaiyuan.context import Principal, RequestContext
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.providers.base import Provider, UpstreamCall, UpstreamReply
from kaiyuan.routing.breaker import CLOSED, HALF_OPEN, OPEN, DeploymentHealth
from kaiyuan.routing.policy import combine, parse_policy
from kaiyuan.routing.retry import (
    CONTENT_POLICY,
    CONTEXT_WINDOW,
    FINAL,
    RETRY,
    backoff,
    classify,
    retry_after_seconds,
)
from kaiyuan.routing.router import Router
from kaiyuan.routing.settings import BreakerSettings, RetrySettings
from kaiyuan.server.common import kaiyuan_headers


def d(ident: str, **kw: Any) -> dict[str, Any]:
    return {"provider": "openai_compatible", "base_url": "http://127.0.0.1:9/v1", "model": "u", "id": ident, **kw}


def cfg(models: list[dict[str, Any]]) -> GatewayConfig:
    return parse_config({"models": models}, "test.yaml")


def bad(models: list[dict[str, Any]]) -> str:
    with pytest.raises(ConfigError) as ei:
        cfg(models)
    return str(ei.value)


class Scripted(Provider):
    """An in-memory provider: answers 200, or fails with probability ``fail``; records what it got."""

    def __init__(self, deployment: Any, rng: random.Random, fail: float, log: list[tuple[str, Scripted]], model: str) -> None:
        super().__init__(deployment)
        self.rng, self.fail, self.log, self.model = rng, fail, log, model

    async def send(self, call: UpstreamCall) -> UpstreamReply:
        self.log.append((self.model, self))
        if self.rng.random() < self.fail:
            if self.rng.random() < 0.5:
                raise GatewayError(ErrorKind.UPSTREAM_UNREACHABLE, f"cannot connect to {self.id}")
            return UpstreamReply(503, {}, body=b'{"error": {"message": "overloaded"}}')
        return UpstreamReply(200, {}, body=b"{}")


def router_for(config: GatewayConfig, rng: random.Random | None = None, fail: dict[str, float] | None = None) -> tuple[Router, list[tuple[str, Scripted]]]:
    rng = rng or random.Random(0)
    log: list[tuple[str, Scripted]] = []
    providers: dict[str, list[Provider]] = {
        m.name: [Scripted(dd, rng, (fail or {}).get(dd.id or "", 0.0), log, m.name) for dd in m.deployments] for m in config.models
    }
    return Router(providers, {m.name: m for m in config.models}, rng=rng), log


def ctx_for(model: str, header: str | None = None, key_policy: str | None = None) -> RequestContext:
    ctx = RequestContext("req", "openai", "chat", headers={"x-kaiyuan-policy": header} if header else {})
    ctx.model = model
    ctx.principal = Principal(policy=key_policy)
    return ctx


def build(p: Provider) -> UpstreamCall:
    return UpstreamCall("chat", {"model": p.deployment.model})


# -- config validation ---------------------------------------------------------------------------

def test_existing_config_shape_still_works() -> None:
    c = cfg([{"name": "m", "deployments": [d("a"), d("b", weight=2)]}])
    assert c.models[0].routing.strategy == "weighted" and c.models[0].routing.fallbacks == []


def test_unknown_strategy_is_rejected_naming_the_key() -> None:
    msg = bad([{"name": "m", "routing": {"strategy": "fastest"}, "deployments": [d("a")]}])
    assert "test.yaml" in msg and "models[0].routing.strategy" in msg and "unknown strategy 'fastest'" in msg
    assert "least_in_flight" in msg


def test_fallback_cycles_are_rejected() -> None:
    msg = bad([
        {"name": "a", "routing": {"fallbacks": ["b"]}, "deployments": [d("x1")]},
        {"name": "b", "routing": {"context_window_fallbacks": ["c"]}, "deployments": [d("x2")]},
        {"name": "c", "routing": {"fallbacks": ["a"]}, "deployments": [d("x3")]},
    ])
    assert "fallbacks form a cycle: a -> b -> c -> a" in msg
    assert "cannot fall back to itself" in bad([{"name": "a", "routing": {"fallbacks": ["a"]}, "deployments": [d("x")]}])


def test_fallback_to_unknown_model_is_rejected() -> None:
    msg = bad([{"name": "a", "routing": {"fallbacks": ["gpt-9"]}, "deployments": [d("x")]}])
    assert "models[0].routing.fallbacks[0]: unknown model 'gpt-9'" in msg and "configured models: a" in msg


def test_cheapest_needs_prices() -> None:
    msg = bad([{"name": "a", "routing": {"strategy": "cheapest"},
                "deployments": [d("x", price={"input": 1, "output": 2}), d("y")]}])
    assert "models[0].deployments[1].price" in msg and "cheapest" in msg


def test_bad_prices_are_rejected() -> None:
    assert "unknown price keys ['prompt']" in bad([{"name": "a", "deployments": [d("x", price={"prompt": 1, "input": 1, "output": 1})]}])
    assert "price needs 'output'" in bad([{"name": "a", "deployments": [d("x", price={"input": 1})]}])
    assert "must be a number >= 0" in bad([{"name": "a", "deployments": [d("x", price={"input": -1, "output": 1})]}])
    ok = cfg([{"name": "a", "deployments": [d("x", price={"input": 1, "output": 2, "cached_input": 0.5, "currency": "cny"})]}])
    assert ok.models[0].deployments[0].price == {"input": 1.0, "output": 2.0, "cached_input": 0.5, "currency": "CNY"}


def test_unsatisfiable_or_malformed_policies_are_rejected() -> None:
    msg = bad([{"name": "a", "routing": {"policy": "self_hosted"}, "deployments": [d("x", tags=["vendor:openai"])]}])
    assert "models[0].routing.policy" in msg and "no deployment of model 'a' satisfies policy 'self_hosted'" in msg
    msg = bad([{"name": "a", "routing": {"policy": "self hosted"}, "deployments": [d("x")]}])
    assert "models[0].routing.policy" in msg and "not a tag" in msg
    assert "is empty" in bad([{"name": "a", "routing": {"policy": " , "}, "deployments": [d("x")]}])


def test_retry_and_breaker_bounds_are_validated() -> None:
    assert "models[0].routing.retries.max_attempts" in bad([{"name": "a", "routing": {"retries": {"max_attempts": 0}}, "deployments": [d("x")]}])
    assert "backoff_max_s must be >= backoff_base_s" in bad(
        [{"name": "a", "routing": {"retries": {"backoff_base_s": 2, "backoff_max_s": 1}}, "deployments": [d("x")]}])
    assert "unknown key" in bad([{"name": "a", "routing": {"breaker": {"threshold": 3}}, "deployments": [d("x")]}])


# -- planner statistics and strategies -----------------------------------------------------------------

def test_weights_respected_within_tolerance() -> None:
    router, _ = router_for(cfg([{"name": "m", "deployments": [d("a", weight=1), d("b", weight=2), d("c", weight=7), d("z", weight=0)]}]))
    n = 20000
    first = Counter(router.plan(ctx_for("m"))[0].id for _ in range(n))
    for ident, share in (("a", 0.1), ("b", 0.2), ("c", 0.7)):
        assert abs(first[ident] / n - share) < 0.015, (ident, first[ident] / n)
    assert first["z"] == 0  # zero weight: only ever a last resort
    assert all(router.plan(ctx_for("m"))[-1].id == "z" for _ in range(200))


def test_least_in_flight_power_of_two() -> None:
    router, _ = router_for(cfg([{"name": "m", "routing": {"strategy": "least_in_flight"}, "deployments": [d("a"), d("b"), d("c")]}]))
    loads = {"a": 0, "b": 3, "c": 9}
    for s in router.routes["m"].slots:
        s.health.in_flight = loads[s.provider.id]
    first = Counter(router.plan(ctx_for("m"))[0].id for _ in range(3000))
    assert first["c"] == 0  # the busiest never wins a pair
    assert first["a"] > first["b"] > 0  # a wins every pair it is in (2/3), b wins only against c (1/3)
    assert abs(first["a"] / 3000 - 2 / 3) < 0.04


def test_lowest_latency_and_cheapest_order() -> None:
    router, _ = router_for(cfg([
        {"name": "lat", "routing": {"strategy": "lowest_latency"}, "deployments": [d("slow"), d("fast"), d("new")]},
        {"name": "cost", "routing": {"strategy": "cheapest"}, "deployments": [
            d("x", price={"input": 3, "output": 15}), d("y", price={"input": 0.14, "output": 0.28}), d("z", price={"input": 0.5, "output": 1})]},
    ]))
    for s in router.routes["lat"].slots:
        if s.provider.id == "slow":
            s.health.success(False, 0.8)
        elif s.provider.id == "fast":
            s.health.success(False, 0.1)
    assert [p.id for p in router.plan(ctx_for("lat"))] == ["new", "fast", "slow"]  # unmeasured first
    assert [p.id for p in router.plan(ctx_for("cost"))] == ["y", "z", "x"]


def test_plan_skips_open_breakers_and_full_deployments() -> None:
    router, _ = router_for(cfg([{"name": "m", "deployments": [d("a"), d("b", max_concurrency=1), d("c")],
                                 "routing": {"breaker": {"failures": 1}}}]))
    slots = {s.provider.id: s for s in router.routes["m"].slots}
    slots["a"].health.failure(False, "boom")
    assert {p.id for p in router.plan(ctx_for("m"))} == {"b", "c"}

    async def go() -> list[str]:
        slots["b"].health.in_flight = 1  # at max_concurrency: skipped by the executor
        out = []
        for _ in range(10):
            p, reply = await router.execute(ctx_for("m"), build)
            await reply.aclose()
            out.append(p.id)
        return out

    assert set(asyncio.run(go())) == {"c"}


# -- breaker and retry rules -----------------------------------------------------------------------------

def test_breaker_transitions_with_an_injected_clock() -> None:
    t = [0.0]
    changes: list[tuple[str, str]] = []
    h = DeploymentHealth("m", "a", BreakerSettings(failures=2, window_s=10, cooldown_s=5, half_open_probes=1),
                         lambda: t[0], lambda _h, a, b: changes.append((a, b)))
    h.failure(h.acquire(t[0]), "x")
    assert h.state == CLOSED
    h.failure(h.acquire(t[0]), "y")
    assert h.state == OPEN and not h.available(t[0]) and not h.available(4.9)
    t[0] = 5.0
    assert h.available(t[0])
    probe = h.acquire(t[0])
    assert probe and h.state == HALF_OPEN and not h.available(t[0])  # one probe at a time
    h.success(probe, 0.1)
    assert h.state == CLOSED
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    # A cancelled probe gives its slot back without a verdict.
    h2 = DeploymentHealth("m", "b", BreakerSettings(failures=1, cooldown_s=1), lambda: t[0])
    h2.failure(False, "x")
    t[0] += 2
    h2.release(h2.acquire(t[0]))
    assert h2.state == HALF_OPEN and h2.available(t[0])


def test_retry_after_cools_a_deployment_down() -> None:
    t = [100.0]
    h = DeploymentHealth("m", "a", BreakerSettings(failures=99), lambda: t[0])
    h.failure(h.acquire(t[0]), "429", retry_after=20)
    assert h.state == CLOSED and not h.available(119.9) and h.available(120.1)
    assert "Retry-After 20s" in str(h.describe(110)["cooldown_reason"])


def test_classify() -> None:
    def up(status: int, msg: str = "x", code: str | None = None) -> GatewayError:
        return GatewayError(ErrorKind.INVALID_REQUEST, msg, status=status, code=code)

    assert classify(up(429), True) == RETRY and classify(up(500), True) == RETRY and classify(up(529), True) == RETRY
    assert classify(up(401), True) == RETRY  # the gateway's upstream key is wrong: another deployment may work
    assert classify(up(400, "Invalid 'temperature'"), True) == FINAL
    assert classify(up(422, "bad schema"), True) == FINAL
    assert classify(up(400, code="context_length_exceeded"), True) == CONTEXT_WINDOW
    assert classify(up(400, "This model's maximum context length is 8192 tokens"), True) == CONTEXT_WINDOW
    assert classify(up(400, code="content_filter"), True) == CONTENT_POLICY
    assert classify(up(400, "Input data may contain inappropriate content."), True) == CONTENT_POLICY
    assert classify(GatewayError(ErrorKind.UPSTREAM_TIMEOUT, "t"), False) == RETRY
    assert classify(GatewayError(ErrorKind.INVALID_REQUEST, "t"), False) == FINAL


def test_retry_after_parsing() -> None:
    assert retry_after_seconds({"Retry-After": "7"}) == 7
    assert retry_after_seconds({"retry-after-ms": "250", "Retry-After": "7"}) == 0.25
    assert retry_after_seconds({"Retry-After": formatdate(1000.0 + 30, usegmt=True)}, now_wall=1000.0) == 30
    assert retry_after_seconds({"Retry-After": "soon"}) is None
    assert retry_after_seconds({"Retry-After": "-3"}) is None
    assert retry_after_seconds({}) is None


def test_backoff_is_jittered_exponential_and_capped() -> None:
    rng = random.Random(1)
    c = RetrySettings(backoff_base_s=0.1, backoff_max_s=1.0)
    for retry, cap in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (12, 1.0)):
        vals = [backoff(retry, c, rng) for _ in range(50)]
        assert all(cap / 2 <= v <= cap for v in vals) and len(set(vals)) > 1
    assert backoff(3, RetrySettings(backoff_base_s=0, backoff_max_s=0), rng) == 0


def test_cost_header_only_when_known() -> None:
    ctx = ctx_for("m")
    assert "x-kaiyuan-cost" not in kaiyuan_headers(ctx)
    ctx.cost_usd = 0.0
    assert kaiyuan_headers(ctx)["x-kaiyuan-cost"] == "0"
    ctx.cost_usd = 0.000123
    assert kaiyuan_headers(ctx)["x-kaiyuan-cost"] == "0.000123"


def test_policy_parsing_and_combination() -> None:
    p = parse_policy("self_hosted | region:eu, !vendor:openai")
    assert p.allows({"self_hosted"}) and p.allows({"region:eu", "vendor:mistral"})
    assert not p.allows({"region:eu", "vendor:openai"}) and not p.allows({"region:us"})
    assert p.why_not({"region:us"}) == "self_hosted|region:eu"
    assert combine([None, "a", "", "a", "!b"]) == "a,!b" and combine([None, " "]) is None
    for text in ("", ",", "!", "a b", "a|", "vendor:x;drop"):
        with pytest.raises(ValueError):
            parse_policy(text)


# -- property: the data policy is never violated ------------------------------------------------------------

TAGS = ["self_hosted", "vendor:a", "vendor:b", "region:eu", "region:us"]
literal = st.tuples(st.booleans(), st.sampled_from(TAGS))
policy_text = st.lists(st.lists(literal, min_size=1, max_size=2), min_size=1, max_size=2).map(
    lambda terms: ",".join("|".join(("!" if neg else "") + tag for neg, tag in term) for term in terms)
)


def oracle(text: str | None, tags: frozenset[str]) -> bool:
    """An independent evaluation of a policy text (does not use kaiyuan.routing.policy)."""
    if not text:
        return True
    for term in text.split(","):
        ok = False
        for lit in term.split("|"):
            lit = lit.strip()
            ok = ok or ((lit[1:] not in tags) if lit.startswith("!") else (lit in tags))
        if not ok:
            return False
    return True


@st.composite
def scenario(draw: st.DrawFn) -> dict[str, Any]:
    n_models = draw(st.integers(1, 3))
    models = []
    fail = {}
    for i in range(n_models):
        deps = []
        for j in range(draw(st.integers(1, 4))):
            ident = f"m{i}d{j}"
            deps.append(d(ident, tags=draw(st.lists(st.sampled_from(TAGS), max_size=3, unique=True)),
                          weight=draw(st.sampled_from([0, 1, 3]))))
            fail[ident] = draw(st.sampled_from([0.0, 0.0, 0.5, 1.0]))
        routing: dict[str, Any] = {
            "strategy": draw(st.sampled_from(["weighted", "least_in_flight", "lowest_latency"])),
            "fallbacks": [f"m{k}" for k in range(i + 1, n_models) if draw(st.booleans())],
            "retries": {"max_attempts": draw(st.integers(1, 4)), "backoff_base_s": 0, "backoff_max_s": 0},
            "breaker": {"failures": draw(st.integers(1, 3)), "cooldown_s": 1000},
        }
        if draw(st.integers(0, 3)) == 0:
            routing["policy"] = draw(policy_text)
        models.append({"name": f"m{i}", "deployments": deps, "routing": routing})
    requests = draw(st.lists(st.tuples(st.integers(0, n_models - 1), st.none() | policy_text, st.none() | policy_text),
                             min_size=1, max_size=8))
    return {"models": models, "fail": fail, "requests": requests, "seed": draw(st.integers(0, 2**16))}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario())
def test_property_no_request_reaches_a_disallowed_deployment(sc: dict[str, Any]) -> None:
    try:
        config = cfg(sc["models"])
    except ConfigError:
        reject()  # an unsatisfiable model policy: rejected at start, as it should be
    router, log = router_for(config, random.Random(sc["seed"]), sc["fail"])
    model_policy = {m.name: m.routing.policy for m in config.models}

    async def run() -> None:
        for model_i, header, key_policy in sc["requests"]:
            ctx = ctx_for(f"m{model_i}", header, key_policy)
            start = len(log)
            try:
                provider, reply = await router.execute(ctx, build)
                await reply.aclose()
                assert log[-1][1] is provider
            except GatewayError as e:
                assert e.status in (502, 503), e
                if len(log) == start:
                    assert e.status == 503
                    if header or key_policy:
                        assert e.code == "policy_unsatisfied" and "data policy" in e.message
            for served_model, p in log[start:]:
                tags = frozenset(p.deployment.tags)
                assert oracle(header, tags) and oracle(key_policy, tags), (header, key_policy, p.id, tags)
                assert oracle(model_policy[served_model], tags), (served_model, p.id, tags)
            assert len(ctx.attempts) == len(log) - start

    asyncio.run(run())


def test_breaker_needs_a_failure_rate_not_just_a_count() -> None:
    t = [0.0]
    cfg_ = BreakerSettings(failures=5, window_s=10, min_failure_rate=0.5)
    busy = DeploymentHealth("m", "busy", cfg_, lambda: t[0])
    rng = random.Random(4)
    for i in range(2000):  # 10% failures at high volume: retries absorb them; never taken out
        t[0] = i * 0.005
        if rng.random() < 0.1:
            busy.failure(busy.acquire(t[0]), "500")
        else:
            busy.success(busy.acquire(t[0]), 0.01)
    assert busy.state == CLOSED and busy.window_counts(t[0])[1] > 5
    for _ in range(4000):  # now it fails every time: open once failures dominate the window
        t[0] += 0.005
        busy.failure(busy.acquire(t[0]), "500")
        if busy.state == OPEN:
            break
    assert busy.state == OPEN and "attempts failed" in busy.reason
    with pytest.raises(ConfigError):
        cfg([{"name": "a", "routing": {"breaker": {"min_failure_rate": 1.5}}, "deployments": [d("x")]}])
