"""Load-balancing strategies: each orders a model's candidate deployments, best first.

The executor tries them in that order (skipping open breakers and full deployments), so the
first element is the deployment a request is sent to and the rest are its failover order.

- ``weighted``: random order, each deployment first with probability weight / sum(weights).
- ``least_in_flight``: power of two choices: of two random deployments, the one with fewer
  requests in flight goes first; the rest follow by in-flight count.
- ``lowest_latency``: lowest EWMA of time to first token first; deployments without a
  measurement yet go first, so each gets measured.
- ``cheapest``: lowest price (input + output USD per million tokens, CNY converted at
  ``accounting.cny_per_usd``: :func:`kaiyuan.routing.router.usd_cost`) first; equal prices weighted.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar


class Candidate(Protocol):
    """What a strategy reads about a deployment (see :class:`kaiyuan.routing.router.Slot`)."""

    @property
    def weight(self) -> float: ...
    @property
    def cost(self) -> float: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def ewma_ttft(self) -> float | None: ...


C = TypeVar("C", bound=Candidate)
Order = Callable[[Sequence[Any], random.Random], list[Any]]


def weighted(cands: Sequence[C], rng: random.Random) -> list[C]:
    if len(cands) <= 1:
        return list(cands)
    # Efraimidis-Spirakis: key u^(1/w) gives a weighted random order without replacement.
    keyed = [(_es_key(c.weight, rng), i) for i, c in enumerate(cands)]
    keyed.sort(reverse=True)
    return [cands[i] for _, i in keyed]


def _es_key(w: float, rng: random.Random) -> float:
    if w <= 0:
        return -1.0 + rng.random() * 1e-9  # zero weight: only after every weighted one
    return rng.random() ** (1.0 / w)


def least_in_flight(cands: Sequence[C], rng: random.Random) -> list[C]:
    n = len(cands)
    if n <= 1:
        return list(cands)
    i = rng.randrange(n)
    j = rng.randrange(n - 1)
    if j >= i:
        j += 1
    a, b = cands[i], cands[j]
    first = a if a.in_flight < b.in_flight or (a.in_flight == b.in_flight and rng.random() < 0.5) else b
    rest = sorted((c for c in cands if c is not first), key=lambda c: (c.in_flight, rng.random()))
    return [first, *rest]


def lowest_latency(cands: Sequence[C], rng: random.Random) -> list[C]:
    if len(cands) <= 1:
        return list(cands)
    return sorted(cands, key=lambda c: (c.ewma_ttft is not None, c.ewma_ttft or 0.0, rng.random()))


def cheapest(cands: Sequence[C], rng: random.Random) -> list[C]:
    if len(cands) <= 1:
        return list(cands)
    return sorted(cands, key=lambda c: (c.cost, -_es_key(c.weight, rng)))


STRATEGY_FUNCS: dict[str, Order] = {
    "weighted": weighted,
    "least_in_flight": least_in_flight,
    "lowest_latency": lowest_latency,
    "cheapest": cheapest,
}
