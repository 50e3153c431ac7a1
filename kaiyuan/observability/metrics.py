"""Prometheus metrics. One registry per gateway, so several gateways can live in one process (tests).

Under ``kaiyuan serve --workers N`` prometheus_client's multiprocess mode is on (the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` for its workers): every worker writes its values to that directory and
``render`` sums all of them, so ``/metrics`` on any worker reports the whole server. The values are
kept in memory and written to the files once a second (:mod:`kaiyuan.observability.multiproc`).
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable, Container
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values

from kaiyuan.context import RequestContext
from kaiyuan.observability import multiproc
from kaiyuan.store.batch_writer import WriterMetrics

UNKNOWN_MODEL = "(unknown)"
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}  # see child(); never cleared
        self._adders: dict[tuple[int, tuple[str, ...]], Callable[[float], None]] = {}  # see adder(); as bounded
        self.requests = Counter(
            "kaiyuan_requests", "Requests by model, deployment, endpoint and status",
            ["model", "deployment", "endpoint", "status"], registry=r,
        )
        self.tokens = Counter(
            "kaiyuan_tokens", "Tokens by model, deployment and kind (prompt, completion, cached, reasoning)",
            ["model", "deployment", "kind"], registry=r,
        )
        self.latency = Histogram(
            "kaiyuan_request_duration_seconds", "Total request latency as the client saw it",
            ["model", "deployment"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "kaiyuan_time_to_first_token_seconds", "Time to the first byte/token sent to the client",
            ["model", "deployment"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.upstream_errors = Counter(
            "kaiyuan_upstream_errors", "Failed upstream attempts by model, deployment and status/kind",
            ["model", "deployment", "kind"], registry=r,
        )
        self.cancelled = Counter(
            "kaiyuan_requests_cancelled", "Requests whose client disconnected", ["model"], registry=r,
        )
        self.in_flight = Gauge("kaiyuan_requests_in_flight", "Requests being served", registry=r,
                               multiprocess_mode="livesum")
        self.in_flight_add = _adder(self.in_flight)  # +1 / -1 per request, on the loop (see adder())
        self.store = WriterMetrics(r)  # every batch writer's written / dropped / set-aside rows
        self.denied = Counter("kaiyuan_guard_denied", "Requests refused by authentication, limits or budgets",
                              ["reason"], registry=r)
        self.spend = Counter("kaiyuan_spend_usd", "Spend recorded, USD", ["model"], registry=r)
        self.unknown_routes = Counter(
            "kaiyuan_unknown_route_requests", "Requests to paths this gateway does not serve (404) or with a method "
            "it does not take there (405), by method and status; the path is in the request log, never a label",
            ["method", "status"], registry=r,
        )

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: prometheus_client's lookup costs ~2 us a call."""
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def adder(self, metric: Any, *labels: str) -> Callable[[float], None]:
        """What ``inc(x)`` (a counter) or ``observe(x)`` (a histogram) of one labelled child does,
        cached and without prometheus_client's per-call checks (a child is always observable; our
        amounts are never negative) and with a bisection for the bucket instead of a walk over the
        bounds: ~3 us less a histogram observation. Same values (``tests/test_metrics_fast.py``);
        a prometheus_client without these internals gets its own methods."""
        key = (id(metric), labels)
        a = self._adders.get(key)
        if a is None:
            a = self._adders[key] = _adder(self.child(metric, *labels))
        return a

    def observe(self, ctx: RequestContext, known_models: Container[str] | None = None) -> None:
        """Count one finished request. A model name outside ``known_models`` (whatever a client
        sent) is labelled ``(unknown)``, so bad requests cannot grow the series without bound."""
        model = ctx.model or ""
        if known_models is not None and model not in known_models:
            model = UNKNOWN_MODEL
        dep = ctx.deployment or ""
        add = self.adder
        add(self.requests, model, dep, ctx.endpoint, str(ctx.status))(1)
        add(self.latency, model, dep)(ctx.elapsed())
        if ctx.ttft is not None:
            add(self.ttft, model, dep)(ctx.ttft)
        u = ctx.usage
        if u.prompt_tokens:
            add(self.tokens, model, dep, "prompt")(u.prompt_tokens)
        if u.completion_tokens:
            add(self.tokens, model, dep, "completion")(u.completion_tokens)
        if u.cached_tokens:
            add(self.tokens, model, dep, "cached")(u.cached_tokens)
        if u.reasoning_tokens:
            add(self.tokens, model, dep, "reasoning")(u.reasoning_tokens)
        for a in ctx.attempts:
            if a.error is not None or (a.status is not None and a.status >= 400):
                self.upstream_errors.labels(model, a.deployment, str(a.status or "transport")).inc()
        if ctx.cancelled:
            self.cancelled.labels(model).inc()

    def unknown_route(self, method: str, status: int) -> None:
        """Count a request to a route that does not exist; any method outside HTTP's own is OTHER."""
        m = method if method in HTTP_METHODS else "OTHER"
        self.child(self.unknown_routes, m, str(status)).inc()

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            if multiproc.active():
                multiproc.sync()  # this process's own values exact; the others' at most one interval old

            every_worker = CollectorRegistry()
            multiprocess.MultiProcessCollector(every_worker)
            return generate_latest(every_worker)
        return generate_latest(self.registry)


def _adder(child: Any) -> Callable[[float], None]:
    """The fast ``inc``/``observe`` of one child (see :meth:`Metrics.adder`). The request metrics
    are counted on the event loop's thread only, so with prometheus_client's in-memory value (or
    ours, :class:`multiproc.BufferedValue`) the float is added to directly, without the value's
    lock (a with-statement per value, a dozen a request); other value classes get their ``inc``."""
    buckets, bounds, total = (getattr(child, n, None) for n in ("_buckets", "_upper_bounds", "_sum"))
    if buckets is not None and bounds is not None and total is not None:  # a histogram
        bounds = tuple(bounds)
        n = len(bounds)
        if _plain(total, *buckets):
            def observe(amount: float) -> None:
                total._value += amount
                i = bisect_left(bounds, amount)  # the first bound >= amount, as prometheus_client's walk finds
                if i < n and amount <= bounds[i]:  # NaN: no bucket, as there
                    buckets[i]._value += 1
            return observe
        incs = tuple(b.inc for b in buckets)

        def observe_locked(amount: float) -> None:
            total.inc(amount)
            i = bisect_left(bounds, amount)
            if i < n and amount <= bounds[i]:
                incs[i](1)
        return observe_locked
    value = getattr(child, "_value", None)
    if value is not None and hasattr(child, "_raise_if_not_observable"):  # a counter
        if _plain(value):
            def inc(amount: float) -> None:
                value._value += amount
            return inc
        return value.inc
    return child.observe if hasattr(child, "observe") else child.inc


def _plain(*vals: Any) -> bool:
    """Whether every value keeps its float in ``_value`` as the two value classes we know do."""
    return all(type(v) in (values.MutexValue, multiproc.BufferedValue) and isinstance(v._value, float) for v in vals)
