"""What a request costs: each deployment's price, the worst case before the call, the real cost after.

Built once at start from the config and the price catalog. ``estimate`` gives the reservation's
size (prompt counted, plus the output cap or the model's output limit, at the highest price of the
model's deployments); ``cost`` prices the upstream's reported usage, or, when an answer went out
with no usage reported, charges the worst case so a budget is never under-counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kaiyuan.accounting.prices import PriceCatalog, ResolvedPrice, deployment_price, vendor_of
from kaiyuan.accounting.tokens import count_prompt, requested_output
from kaiyuan.config import AccountingSettings, DeploymentBase, ModelConfig
from kaiyuan.context import RequestContext

log = logging.getLogger("kaiyuan.costing")

BILLED_ENDPOINTS = frozenset({"chat", "completions", "embeddings", "messages"})


@dataclass(frozen=True, slots=True)
class PricedDeployment:
    deployment: DeploymentBase
    price: ResolvedPrice | None
    vendor: str


class Costing:
    def __init__(self, models: list[ModelConfig], acc: AccountingSettings) -> None:
        self.acc = acc
        self.catalog = PriceCatalog.load(acc)
        self.deployments: dict[str, PricedDeployment] = {}
        self.model_deps: dict[str, list[str]] = {}
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

    def estimate(self, model: str, body: dict[str, Any], endpoint: str) -> tuple[int, float, str | None]:
        """(prompt tokens, worst-case USD, first deployment without a price) over the model's deployments."""
        prompt = 0
        worst = 0.0
        unpriced = None
        cap = requested_output(body, endpoint)
        for did in self.model_deps.get(model, ()):
            pd = self.deployments[did]
            p = count_prompt(pd.deployment.model, body)
            prompt = max(prompt, p)
            if pd.price is None:
                unpriced = unpriced or did
                continue
            out = cap if cap is not None else (pd.price.max_output_tokens or self.acc.default_max_output_tokens)
            worst = max(worst, pd.price.worst_case(p, out))
        return prompt, worst, unpriced

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
            return price.cost(u)
        if ctx.endpoint not in BILLED_ENDPOINTS:
            return None  # an endpoint we do not know how to price without usage
        if ctx.ttft is None and ctx.status >= 400:
            return 0.0  # the upstream refused or failed before answering: nothing billed
        # An answer went out but the upstream reported no usage (e.g. the client hung up mid-stream):
        # charge the worst case we reserved for it, so a budget can never be under-counted.
        prompt = ctx.prompt_estimate
        if prompt is None:
            prompt = count_prompt(pd.deployment.model, ctx.body)
        cap = requested_output(ctx.body, ctx.endpoint)
        out = cap if cap is not None else (price.max_output_tokens or self.acc.default_max_output_tokens)
        return price.worst_case(prompt, out)
