"""What an admitted request reserves: tokens for TPM limits and money for budgets.

The reservation must cover the most the request can cost, whatever the plan does with it. So it is
the maximum, over every deployment the request can reach (the model's own, its fallbacks' at any
depth, a canary or promote target), of

    prompt tokens x the input price (or the cache-write price, if higher)
    + cap x n x the output price

where the prompt is counted with that deployment's tokenizer (or the stated margin, see
:mod:`kaiyuan.accounting.tokens`) and ``cap`` is the output cap the gateway sends that deployment
(:mod:`kaiyuan.accounting.output_cap`). TPM limits reserve ``prompt + cap x n`` tokens the same
way, and the settle corrects both to what the upstream reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from kaiyuan.accounting.output_cap import OutputAsk, OutputCaps
from kaiyuan.accounting.prices import ResolvedPrice
from kaiyuan.accounting.tokens import count_with, counter_for
from kaiyuan.config import DeploymentBase

DeploymentEntry = tuple[DeploymentBase, "ResolvedPrice | None", str]


class Reservation(NamedTuple):  # one per reserved request: a named tuple is the cheapest to make
    prompt_tokens: int  # the largest prompt count over the reachable deployments
    tokens: int  # for TPM: the largest prompt + cap x n
    worst_usd: float  # for budgets: the largest worst-case cost
    unpriced: str | None  # the first reachable deployment without a price (budgets cannot hold there)


def reserve(deployments: Iterable[str], table: Mapping[str, DeploymentEntry], caps: OutputCaps, ask: OutputAsk,
            body: dict[str, Any]) -> Reservation:
    prompt = tokens = 0
    worst = 0.0
    unpriced = None
    counted: dict[str, int] = {}  # one count per tokenizer, however many deployments share it
    for did in deployments:
        entry = table.get(did)
        if entry is None:
            continue
        dep, price, _vendor = entry
        count, enc = counter_for(dep.model)
        p = counted.get(enc)
        if p is None:
            p = counted[enc] = count_with(count, body)
        out = caps.reserved_output(did, ask)
        prompt = max(prompt, p)
        tokens = max(tokens, p + out)
        if price is None:
            unpriced = unpriced or did
            continue
        worst = max(worst, price.worst_case(p, out))
    return Reservation(prompt, tokens, worst, unpriced)
