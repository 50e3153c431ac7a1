"""The router: for one request, the ordered list of deployments to try.

Weighted random order among the usable deployments of the requested model.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from kaiyuan.context import RequestContext
from kaiyuan.providers.base import Provider


class Router:
    def __init__(self, deployments_by_model: dict[str, list[Provider]]) -> None:
        self.by_model = deployments_by_model
        self._rng = random.Random()

    def plan(self, ctx: RequestContext) -> Sequence[Provider]:
        candidates = [p for p in self.by_model.get(ctx.model or "", ()) if p.unavailable is None]
        if len(candidates) <= 1:
            return candidates
        weights = [max(p.deployment.weight, 0.0) for p in candidates]
        if sum(weights) <= 0:
            return candidates
        # Efraimidis-Spirakis: weighted order without replacement.
        keyed = sorted(
            candidates,
            key=lambda p: -(self._rng.random() ** (1.0 / p.deployment.weight)) if p.deployment.weight > 0 else 1.0,
        )
        return keyed
