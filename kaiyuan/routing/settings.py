"""Routing configuration (``models[].routing``) and the checks that need the whole config.

Kept apart from :mod:`kaiyuan.config` so that module only grows by one field; it imports this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

STRATEGIES = ("weighted", "least_in_flight", "lowest_latency", "cheapest")
Strategy = Literal["weighted", "least_in_flight", "lowest_latency", "cheapest"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RetrySettings(_Strict):
    """How hard to try one model's deployments before its fallbacks."""

    max_attempts: int = Field(default=3, ge=1, le=20, description="upstream attempts on this model's deployments")
    backoff_base_s: float = Field(default=0.05, ge=0, description="first backoff before retrying a deployment already tried")
    backoff_max_s: float = Field(default=2.0, ge=0)
    max_total_s: float = Field(default=300.0, gt=0, description="no attempt runs past this (whole request, before the answer starts)")
    max_retry_after_s: float = Field(default=5.0, ge=0, description="longer Retry-After values are not waited for")

    @model_validator(mode="after")
    def _order(self) -> RetrySettings:
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError("backoff_max_s must be >= backoff_base_s")
        return self


class BreakerSettings(_Strict):
    """Per-deployment circuit breaker: ``failures`` failures in ``window_s``, being at least
    ``min_failure_rate`` of the attempts there and coming from ``min_callers`` callers, open it for
    ``cooldown_s``; when they come from fewer, only those callers are cooled down."""

    enabled: bool = True
    failures: int = Field(default=5, ge=1)
    min_failure_rate: float = Field(
        default=0.5, ge=0, le=1, description="and at least this share of the window's attempts failed"
    )
    window_s: float = Field(default=30.0, gt=0)
    cooldown_s: float = Field(default=30.0, gt=0)
    half_open_probes: int = Field(default=1, ge=1, description="successful probes needed to close again")
    min_callers: int = Field(
        default=2, ge=1, description="distinct callers (virtual keys, or client addresses without one) whose failures "
                                     "it takes to open the breaker for everyone; fewer cool down only those callers")


class RoutingSettings(_Strict):
    strategy: Strategy = "weighted"
    policy: str | None = Field(default=None, description="data policy every request to this model must satisfy")
    fallbacks: list[str] = Field(default_factory=list, description="models to try, in order, when all deployments fail")
    context_window_fallbacks: list[str] = Field(default_factory=list)
    content_policy_fallbacks: list[str] = Field(default_factory=list)
    retries: RetrySettings = Field(default_factory=lambda: RetrySettings())
    breaker: BreakerSettings = Field(default_factory=lambda: BreakerSettings())

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in STRATEGIES:
            raise ValueError(f"unknown strategy {v!r}; use one of: {', '.join(STRATEGIES)}")
        return v

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str | None) -> str | None:
        if v is not None:
            from kaiyuan.routing.policy import parse_policy

            parse_policy(v)  # raises ValueError with the reason
        return v


def check_routing(models: Sequence[Any]) -> None:
    """Whole-config checks: fallbacks name known models, no cycles, prices under ``cheapest``,
    model policies that some deployment satisfies. Raises ValueError naming the key."""
    from kaiyuan.routing.policy import parse_policy

    index = {m.name: i for i, m in enumerate(models)}
    graph: dict[str, list[str]] = {}
    for i, m in enumerate(models):
        r: RoutingSettings = m.routing
        where = f"models[{i}].routing"
        edges: list[str] = []
        for key in ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks"):
            for j, name in enumerate(getattr(r, key)):
                if name not in index:
                    known = ", ".join(sorted(index)) or "(none)"
                    raise ValueError(f"{where}.{key}[{j}]: unknown model {name!r}; configured models: {known}")
                if name == m.name:
                    raise ValueError(f"{where}.{key}[{j}]: model {m.name!r} cannot fall back to itself")
                edges.append(name)
        graph[m.name] = edges
        if r.strategy == "cheapest":
            for j, d in enumerate(m.deployments):
                if d.price is None:
                    raise ValueError(
                        f"models[{i}].deployments[{j}].price: model {m.name!r} uses strategy 'cheapest', "
                        f"so every deployment needs a price (e.g. price: {{input: 0.27, output: 1.10}})"
                    )
        if r.policy is not None:
            pol = parse_policy(r.policy)
            if not any(pol.allows(d.tags) for d in m.deployments):
                raise ValueError(
                    f"{where}.policy: no deployment of model {m.name!r} satisfies policy {r.policy!r} "
                    f"(deployment tags: {[list(d.tags) for d in m.deployments]})"
                )
    cycle = _find_cycle(graph)
    if cycle:
        start = cycle[0]
        raise ValueError(
            f"models[{index[start]}].routing: fallbacks form a cycle: {' -> '.join(cycle)}"
        )


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        colour[n] = GREY
        stack.append(n)
        for nxt in graph.get(n, ()):
            if colour.get(nxt) == GREY:
                return [*stack[stack.index(nxt):], nxt]
            if colour.get(nxt) == WHITE:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        colour[n] = BLACK
        return None

    for n in graph:
        if colour[n] == WHITE:
            found = visit(n)
            if found:
                return found
    return None
