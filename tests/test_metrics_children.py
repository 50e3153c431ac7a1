"""Metrics.observe caches label children; every label combination must still count on its own."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from kaiyuan.context import RequestContext
from kaiyuan.observability.metrics import Metrics


def _ctx(model: str, status: int, prompt: int) -> RequestContext:
    c = RequestContext("r", "openai", "chat")
    c.model, c.deployment, c.status = model, f"dep-{model}", status
    c.usage.prompt_tokens = prompt
    return c


def _samples(m: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_each_label_combination_counts_separately() -> None:
    m = Metrics()
    for ctx in [_ctx("a", 200, 3), _ctx("a", 200, 4), _ctx("a", 429, 0), _ctx("b", 200, 5)]:
        m.observe(ctx)
    reqs = _samples(m, "kaiyuan_requests_total")
    assert reqs == {
        (("deployment", "dep-a"), ("endpoint", "chat"), ("model", "a"), ("status", "200")): 2.0,
        (("deployment", "dep-a"), ("endpoint", "chat"), ("model", "a"), ("status", "429")): 1.0,
        (("deployment", "dep-b"), ("endpoint", "chat"), ("model", "b"), ("status", "200")): 1.0,
    }
    tokens = _samples(m, "kaiyuan_tokens_total")
    assert tokens == {
        (("deployment", "dep-a"), ("kind", "prompt"), ("model", "a")): 7.0,
        (("deployment", "dep-b"), ("kind", "prompt"), ("model", "b")): 5.0,
    }
    counts = _samples(m, "kaiyuan_request_duration_seconds_count")
    assert counts == {(("deployment", "dep-a"), ("model", "a")): 3.0, (("deployment", "dep-b"), ("model", "b")): 1.0}


def test_cached_child_is_prometheus_own() -> None:
    m = Metrics()
    assert m.child(m.requests, "a", "d", "chat", "200") is m.requests.labels("a", "d", "chat", "200")
    assert m.child(m.latency, "a", "d") is not m.child(m.ttft, "a", "d")  # same labels, other metric
