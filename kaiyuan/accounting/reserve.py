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
from kaiyuan.accounting.tokens import Counter, count_with, counter_for
from kaiyuan.config import DeploymentBase

DeploymentEntry = tuple[DeploymentBase, "ResolvedPrice | None", str]


class Reservation(NamedTuple):  # one per reserved request: a named tuple is the cheapest to make
    prompt_tokens: int  # the largest prompt count over the reachable deployments
    tokens: int  # for TPM: the largest prompt + cap x n
    worst_usd: float  # for budgets: the largest worst-case cost
    unpriced: str | None  # the first reachable deployment without a price (budgets cannot hold there)


class Step(NamedTuple):
    """One deployment a request can reach, with what its reservation needs, looked up once per plan."""

    deployment: str
    count: Counter  # its tokenizer's count (or the estimate)
    encoding: str  # which one: deployments that share it share one count
    price: ResolvedPrice | None


def plan(deployments: Iterable[str], table: Mapping[str, DeploymentEntry]) -> tuple[Step, ...]:
    """The steps of ``reserve`` for these deployments (the unknown ones left out)."""
    out = []
    for did in deployments:
        entry = table.get(did)
        if entry is not None:
            count, enc = counter_for(entry[0].model)
            out.append(Step(did, count, enc, entry[1]))
    return tuple(out)


def reserve(steps: tuple[Step, ...], caps: OutputCaps, ask: OutputAsk, body: dict[str, Any]) -> Reservation:
    prompt = tokens = 0
    worst = 0.0
    unpriced = None
    counted: dict[str, int] = {}  # one count per tokenizer, however many deployments share it
    for did, count, enc, price in steps:
        p = counted.get(enc)
        if p is None:
            p = counted[enc] = count_with(count, body)
        out = caps.reserved_output(did, ask)
        if p > prompt:
            prompt = p
        if p + out > tokens:
            tokens = p + out
        if price is None:
            unpriced = unpriced or did
            continue
        w = price.worst_case(p, out)
        if w > worst:
            worst = w
    # tuple.__new__: the named tuple's own __new__ is a Python function, several times the cost
    return tuple.__new__(Reservation, (prompt, tokens, worst, unpriced))
