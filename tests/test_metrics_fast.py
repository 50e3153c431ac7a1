"""Metrics.adder (the per-request metrics' fast path) gives the values prometheus_client's own
``inc``/``observe`` give: same buckets (bounds included), sums and counts, and the locked path for
value classes it does not know."""

from __future__ import annotations

import math
import random
from typing import Any

from prometheus_client import generate_latest

from kaiyuan.observability import metrics as m
from kaiyuan.observability.metrics import LATENCY_BUCKETS, Metrics


def _amounts() -> list[float]:
    rnd = random.Random(3)
    edge = [b for b in LATENCY_BUCKETS] + [0.0, 1e-9, 1e6, math.inf, math.nan]
    return edge + [rnd.expovariate(5) for _ in range(500)]


def _values(met: Metrics) -> list[str]:
    """The exposition without the ``_created`` timestamps (when each series was made)."""
    return [line for line in generate_latest(met.registry).decode().splitlines() if "_created" not in line]


def test_fast_histogram_and_counter_match_prometheus_client() -> None:
    fast, slow = Metrics(), Metrics()
    for x in _amounts():
        fast.adder(fast.latency, "m", "d")(x)
        slow.child(slow.latency, "m", "d").observe(x)
        if not math.isnan(x) and not math.isinf(x):
            fast.adder(fast.tokens, "m", "d", "prompt")(int(x * 100))
            slow.child(slow.tokens, "m", "d", "prompt").inc(int(x * 100))
    assert _values(fast) == _values(slow)
    assert b'kaiyuan_request_duration_seconds_bucket{deployment="d",le="0.005",model="m"}' in generate_latest(fast.registry)


def test_observe_counts_a_request_once_in_each_metric() -> None:
    from kaiyuan.context import RequestContext

    met = Metrics()
    ctx = RequestContext("r1", "openai", "chat")
    ctx.model, ctx.deployment, ctx.status, ctx.ttft = "bench", "dep", 200, 0.002
    ctx.usage.prompt_tokens, ctx.usage.completion_tokens = 12, 20
    for _ in range(3):
        met.observe(ctx, {"bench"})
    text = generate_latest(met.registry).decode()
    assert 'kaiyuan_requests_total{deployment="dep",endpoint="chat",model="bench",status="200"} 3.0' in text
    assert 'kaiyuan_tokens_total{deployment="dep",kind="prompt",model="bench"} 36.0' in text
    assert 'kaiyuan_tokens_total{deployment="dep",kind="completion",model="bench"} 60.0' in text
    assert 'kaiyuan_time_to_first_token_seconds_bucket{deployment="dep",le="0.005",model="bench"} 3.0' in text
    assert 'kaiyuan_request_duration_seconds_count{deployment="dep",model="bench"} 3.0' in text


class _OtherValue:
    """A value class the fast path does not know: it must be called through ``inc``."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self._value: Any = 0.0

    def inc(self, amount: float) -> None:
        self.calls.append(amount)
        self._value += amount


def test_an_unknown_value_class_goes_through_its_inc() -> None:
    met = Metrics()
    child = met.child(met.latency, "m", "d")
    child._sum = _OtherValue()
    child._buckets = [_OtherValue() for _ in child._buckets]
    m._adder(child)(0.007)
    assert child._sum.calls == [0.007]
    assert [b.calls for b in child._buckets][1] == [1] and sum(len(b.calls) for b in child._buckets) == 1
    counter = met.child(met.requests, "m", "d", "chat", "200")
    counter._value = _OtherValue()
    m._adder(counter)(2)
    assert counter._value.calls == [2]


def test_in_flight_add_moves_the_gauge() -> None:
    met = Metrics()
    met.in_flight_add(1)
    met.in_flight_add(1)
    met.in_flight_add(-1)
    assert met.in_flight._value.get() == 1
    assert "kaiyuan_requests_in_flight 1.0" in generate_latest(met.registry).decode()
