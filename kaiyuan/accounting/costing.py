"""What a request costs: each deployment's price, the worst case before the call, the real cost after.

Built once at start from the config and the price catalog, with each deployment's output cap
(:mod:`kaiyuan.accounting.output_cap`). ``reservation`` gives the reservation's size over every
deployment a request can reach (:mod:`kaiyuan.accounting.reserve`); ``cost`` prices the
upstream's reported usage, or, when an answer went out with no usage reported, charges the worst
case so a budget is never under-counted.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from kaiyuan.accounting.output_cap import OutputCaps, ask_of
from kaiyuan.accounting.prices import PriceCatalog, ResolvedPrice, deployment_price, vendor_of
from kaiyuan.accounting.reserve import Reservation, Step, plan, reserve
from kaiyuan.accounting.tokens import count_prompt
from kaiyuan.config import AccountingSettings, DeploymentBase, ModelConfig
from kaiyuan.context import RequestContext

log = logging.getLogger("kaiyuan.costing")

PLANS_MAX = 1024  # reaches (tuples of model names) whose reservation steps are kept
BILLED_ENDPOINTS = frozenset({"chat", "completions", "embeddings", "messages", "responses"})


class PricedDeployment(NamedTuple):
    deployment: DeploymentBase
    price: ResolvedPrice | None
    vendor: str


class Costing:
    def __init__(self, models: list[ModelConfig], acc: AccountingSettings) -> None:
        self.acc = acc
        self.catalog = PriceCatalog.load(acc)
        self.deployments: dict[str, PricedDeployment] = {}
        self.model_deps: dict[str, list[str]] = {}
        self._plans: dict[tuple[str, ...], tuple[Step, ...]] = {}  # a reach's steps, worked out once
        for m in models:
            ids = []
            for d in m.deployments:
                price = deployment_price(d, self.catalog)
                did = d.id or d.default_id()
                self.deployments[did] = PricedDeployment(d, price, vendor_of(d, price))
                ids.append(did)
                if price is None:
                    log.warning(
                        "model %s: deployment %s (upstream model %r) has NO PRICE: its cost will be shown as unknown "
                        "and keys with budgets cannot use it; add `price: {input: ..., output: ...}` to the deployment "
                        "(0 for self-hosted) or a row to accounting.prices_file",
                        m.name, did, d.model,
                    )
            self.model_deps[m.name] = ids
        self.caps = OutputCaps.build(
            [(did, pd.deployment, pd.price.max_output_tokens if pd.price else None,
              pd.price is not None and pd.price.charges_output()) for did, pd in self.deployments.items()],
            acc,
        )

    def reservation(self, models: tuple[str, ...], ctx: RequestContext) -> Reservation:
        """What ``ctx`` reserves over every deployment of ``models`` (the plan's reach)."""
        steps = self._plans.get(models)
        if steps is None:
            if len(self._plans) >= PLANS_MAX:
                self._plans.clear()
            steps = self._plans[models] = plan([d for m in models for d in self.model_deps.get(m, ())], self.deployments)
        return reserve(steps, self.caps, ask_of(ctx), ctx.prompt_body())

    def prompt_count(self, ctx: RequestContext) -> int:
        """The prompt as the gateway counts it (at reservation, or now for the deployment that answered)."""
        if ctx.prompt_estimate is not None:
            return ctx.prompt_estimate
        pd = self.deployments.get(ctx.deployment or "")
        return count_prompt(pd.deployment.model if pd else "", ctx.prompt_body())

    def cost(self, ctx: RequestContext) -> float | None:
        """The request's cost in USD, ``None`` when unknown (never reached an upstream, or no price)."""
        if ctx.deployment is None:
            return None
        pd = self.deployments.get(ctx.deployment)
        if pd is None or pd.price is None:
            return None
        if ctx.endpoint == "count_tokens":
            return 0.0  # vendors do not bill token counting
        price = pd.price
        u = ctx.usage
        if u.prompt_tokens is not None or u.completion_tokens is not None:
            # A whole answer is priced for its x-kaiyuan-cost header and again at the settle: the
            # second time, the same price and usage (the settle may have clamped it) give the same cost.
            what = (price, u.prompt_tokens, u.completion_tokens, u.cached_tokens, u.cache_write_tokens)
            hit = ctx.priced
            if hit is not None and hit[0] == what:  # (the price compared by identity first: one object)
                return hit[1]
            cost = price.cost(u)
            ctx.priced = (what, cost)
            return cost
        if ctx.endpoint not in BILLED_ENDPOINTS:
            return None  # an endpoint we do not know how to price without usage
        if ctx.ttft is None and ctx.status >= 400:
            return 0.0  # the upstream refused or failed before answering: nothing billed
        # An answer went out but the upstream reported no usage (e.g. the client hung up mid-stream):
        # charge the worst case we reserved for it, so a budget can never be under-counted.
        return price.worst_case(self.prompt_count(ctx), self.caps.reserved_output(ctx.deployment, ask_of(ctx)))
