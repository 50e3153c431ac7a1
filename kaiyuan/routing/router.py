"""The router: per-model routing state (deployment health, strategy, policy) and the plan for a request.

``Router.execute`` (see :mod:`kaiyuan.routing.executor`) tries the plan: deployments in strategy
order, retries with backoff, then fallback models. Everything here runs on the event loop thread.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from kaiyuan.context import RequestContext
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.providers.base import Provider, UpstreamReply
from kaiyuan.routing.breaker import STATE_VALUE, Clock, DeploymentHealth
from kaiyuan.routing.policy import POLICY_HEADER, Policy, combine, parse_policy
from kaiyuan.routing.settings import RoutingSettings
from kaiyuan.routing.strategies import STRATEGY_FUNCS, Order

if TYPE_CHECKING:
    from kaiyuan.config import ModelConfig
    from kaiyuan.routing.executor import Build

log = logging.getLogger("kaiyuan.routing")
_POLICY_CACHE_MAX = 1024


@dataclass(slots=True, eq=False)
class Slot:
    """One deployment of one model, as the router sees it."""

    model: str
    provider: Provider
    health: DeploymentHealth
    weight: float
    cost: float
    tags: frozenset[str]

    @property
    def in_flight(self) -> int:
        return self.health.in_flight

    @property
    def ewma_ttft(self) -> float | None:
        return self.health.ewma_ttft


@dataclass(slots=True)
class Overrun:
    """A deployment seen producing more output than the cap it was sent (it ignores max_tokens)."""

    count: int
    last_at: float
    last_cap: int
    last_output: int


@dataclass(slots=True, eq=False)
class ModelRoute:
    name: str
    settings: RoutingSettings
    slots: list[Slot]
    order: Order
    policy: Policy | None


class RoutingMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry or CollectorRegistry()
        self.state = Gauge(
            "kaiyuan_deployment_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open",
            ["model", "deployment"], registry=r,
        )
        self.changes = Counter(
            "kaiyuan_deployment_state_changes", "Circuit breaker state changes",
            ["model", "deployment", "from_state", "to_state"], registry=r,
        )
        self.fallbacks = Counter(
            "kaiyuan_routing_fallbacks", "Requests served by a fallback model", ["model", "fallback"], registry=r,
        )
        self.overruns = Counter(
            "kaiyuan_max_tokens_overruns", "Answers that ran past the output cap the gateway sent (cut at the cap)",
            ["deployment"], registry=r,
        )
        self.refusals = Counter(
            "kaiyuan_routing_refusals", "Requests refused because no allowed deployment was usable",
            ["model", "reason"], registry=r,
        )


DEFAULT_CNY_PER_USD = 7.1  # accounting.cny_per_usd's default; the gateway passes the configured rate


def usd_cost(price: dict[str, Any], cny_per_usd: float) -> float:
    """A deployment's price for the ``cheapest`` strategy: input + output USD per million tokens,
    a CNY price converted at ``accounting.cny_per_usd`` (so CNY 1/2 ranks before USD 1/1);
    infinite when unknown."""
    if "input" not in price or "output" not in price:
        return float("inf")
    total = float(price["input"]) + float(price["output"])
    return total / cny_per_usd if price.get("currency") == "CNY" else total


class Router:
    def __init__(
        self,
        providers: dict[str, list[Provider]],
        models: dict[str, ModelConfig] | None = None,
        registry: CollectorRegistry | None = None,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        cny_per_usd: float = DEFAULT_CNY_PER_USD,
    ) -> None:
        self.by_model = providers
        self.rng = rng or random.Random()
        self.metrics = RoutingMetrics(registry)
        self._clock = clock
        self.routes: dict[str, ModelRoute] = {}
        self._policy_cache: dict[str, Policy] = {}
        self._allowed_cache: dict[tuple[str, str], list[Slot]] = {}
        self._satisfiable: dict[tuple[str, str], tuple[str, ...]] = {}
        self.overruns: dict[str, Overrun] = {}  # deployment id -> what it did (bounded by the config)
        for name, provs in providers.items():
            mc = models.get(name) if models else None
            settings: RoutingSettings = getattr(mc, "routing", None) or RoutingSettings()
            slots = []
            for p in provs:
                d = p.deployment
                h = DeploymentHealth(name, p.id, settings.breaker, self._now, self._on_state)
                cost = usd_cost(d.price or {}, cny_per_usd)
                slots.append(Slot(name, p, h, d.weight, cost, frozenset(d.tags)))
                self.metrics.state.labels(name, p.id).set(0)
            self.routes[name] = ModelRoute(
                name, settings, slots, STRATEGY_FUNCS[settings.strategy],
                parse_policy(settings.policy) if settings.policy else None,
            )

        self._reachable = {name: self._closure(name) for name in self.routes}

    def _closure(self, model: str) -> tuple[str, ...]:
        """``model`` and every fallback (any list, any depth) the executor may try after it."""
        out = [model]
        i = 0
        while i < len(out):
            route = self.routes.get(out[i])
            i += 1
            if route is None:
                continue
            st = route.settings
            for name in (*st.fallbacks, *st.context_window_fallbacks, *st.content_policy_fallbacks):
                if name not in out:
                    out.append(name)
        return tuple(out)

    def reachable(self, model: str) -> tuple[str, ...]:
        return self._reachable.get(model, (model,))

    # -- time (injectable for tests) ---------------------------------------------------------
    def _now(self) -> float:
        return self._clock()

    def set_clock(self, clock: Clock) -> None:
        self._clock = clock

    def now(self) -> float:
        return self._clock()

    def _on_state(self, h: DeploymentHealth, old: str, new: str) -> None:
        self.metrics.state.labels(h.model, h.deployment).set(STATE_VALUE[new])
        self.metrics.changes.labels(h.model, h.deployment, old, new).inc()
        log.warning("model %s deployment %s: circuit %s -> %s (%s)", h.model, h.deployment, old, new, h.reason)

    # -- policy --------------------------------------------------------------------------------
    def policy(self, text: str) -> Policy:
        pol = self._policy_cache.get(text)
        if pol is None:
            pol = parse_policy(text)  # ValueError for the caller to turn into a 400
            if len(self._policy_cache) >= _POLICY_CACHE_MAX:
                self._policy_cache.clear()
            self._policy_cache[text] = pol
        return pol

    def request_policy(self, ctx: RequestContext) -> Policy | None:
        """The key/team policy and the request header's, combined with AND; sets ``ctx.policy``
        (which also names the model's own policy, applied per model by :meth:`allowed`)."""
        header = ctx.headers.get(POLICY_HEADER) if ctx.headers is not None else None
        key_policy = ctx.principal.policy
        route = self.routes.get(ctx.model or "")
        model_policy = route.settings.policy if route else None
        if not header and not key_policy:
            ctx.policy = model_policy
            return None
        ctx.policy = combine((key_policy, header, model_policy))
        if header:
            try:
                self.policy(header)
            except ValueError as e:
                raise GatewayError(ErrorKind.INVALID_REQUEST, f"{POLICY_HEADER} header: {e}", code="invalid_policy") from None
        if key_policy:
            try:
                self.policy(key_policy)
            except ValueError as e:
                raise GatewayError(
                    ErrorKind.PERMISSION, f"this key's data policy is invalid ({e}); ask an administrator to fix it",
                    code="invalid_policy",
                ) from None
        text = combine((key_policy, header))
        assert text is not None
        return self.policy(text)

    def allowed(self, route: ModelRoute, policy: Policy | None) -> list[Slot]:
        """The model's deployments that both the model policy and the request policy allow."""
        if policy is None:
            if route.policy is None:
                return route.slots
            key = (route.name, "")
        else:
            key = (route.name, policy.text)
        got = self._allowed_cache.get(key)
        if got is None:
            got = [
                s for s in route.slots
                if (route.policy is None or route.policy.allows(s.tags)) and (policy is None or policy.allows(s.tags))
            ]
            if len(self._allowed_cache) >= _POLICY_CACHE_MAX:
                self._allowed_cache.clear()
            self._allowed_cache[key] = got
        return got

    def satisfiable(self, model: str, policy: Policy) -> tuple[str, ...]:
        """The models the executor may reach from ``model`` (itself first, then its fallbacks, any
        list, any depth) that have at least one deployment ``policy`` and their own policy allow.
        Empty: no attempt could ever satisfy the policy. Computed once per (model, policy) text, so
        authorization costs a dict lookup."""
        key = (model, policy.text)
        got = self._satisfiable.get(key)
        if got is None:
            got = tuple(name for name in self.reachable(model)
                        if (route := self.routes.get(name)) is not None and self.allowed(route, policy))
            if len(self._satisfiable) >= _POLICY_CACHE_MAX:
                self._satisfiable.clear()
            self._satisfiable[key] = got
        return got

    def order(self, route: ModelRoute, slots: Sequence[Slot]) -> list[Slot]:
        return route.order(slots, self.rng)

    # -- the plan ------------------------------------------------------------------------------
    def plan(self, ctx: RequestContext) -> list[Provider]:
        """The requested model's deployments this request may use now, in the order they would be tried."""
        route = self.routes.get(ctx.model or "")
        if route is None:
            return []
        now = self.now()
        slots = self.order(route, self.allowed(route, self.request_policy(ctx)))
        return [s.provider for s in slots if s.provider.unavailable is None and s.health.available(now)]

    async def execute(
        self, ctx: RequestContext, build: Build
    ) -> tuple[Provider, UpstreamReply]:
        from kaiyuan.routing.executor import execute

        return await execute(self, ctx, build)

    def flag_overrun(self, deployment: str, cap: int, output: int) -> None:
        """Remember that ``deployment`` produced ``output`` tokens against a cap of ``cap``."""
        o = self.overruns.get(deployment)
        if o is None:
            if not any(s.provider.id == deployment for r in self.routes.values() for s in r.slots):
                return
            o = self.overruns[deployment] = Overrun(0, 0.0, cap, output)
            log.warning("deployment %s does not honour max_tokens: %d output tokens against a cap of %d; the gateway "
                        "cuts its answers at the cap (see /admin/deployments)", deployment, output, cap)
        o.count += 1
        o.last_at, o.last_cap, o.last_output = time.time(), cap, output
        self.metrics.overruns.labels(deployment).inc()

    # -- admin -------------------------------------------------------------------------------------
    def describe(self) -> list[dict[str, Any]]:
        now = self.now()
        out = []
        for route in self.routes.values():
            for s in route.slots:
                d = s.provider.deployment
                entry: dict[str, Any] = {
                    "model": route.name,
                    "deployment": s.provider.id,
                    "provider": getattr(d, "provider", None),
                    "upstream_model": d.model,
                    "strategy": route.settings.strategy,
                    "weight": d.weight,
                    "tags": sorted(s.tags),
                    "price": d.price,
                    **s.health.describe(now),
                    "honours_max_tokens": s.provider.id not in self.overruns,
                }
                o = self.overruns.get(s.provider.id)
                if o is not None:
                    entry["max_tokens_overruns"] = {"count": o.count, "last_at": o.last_at, "last_cap": o.last_cap,
                                                    "last_output": o.last_output}
                if s.provider.unavailable:
                    entry["state"] = "unavailable"
                    entry["reason"] = s.provider.unavailable
                cap = s.health.over_capacity(now, d.rpm, d.tpm, d.max_concurrency)
                if cap:
                    entry["capacity"] = cap
                out.append(entry)
        return out
