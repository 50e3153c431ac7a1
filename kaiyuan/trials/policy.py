"""Data policy for trial traffic: a shadow, judge or replay call may only go where the original
request may go.

Same language as the router's data policies (``kaiyuan.routing.policy``): a comma-separated list
of terms that must all hold; a term is a tag the deployment must carry (``self_hosted``), a tag it
must not carry (``!vendor:openai``), or alternatives separated by ``|`` (``region:eu|self_hosted``).
The request's policies - ``ctx.policy`` (set by the router: key, header and model policies
combined), ``ctx.principal.policy`` and the ``x-kaiyuan-policy`` header - are ALL applied (AND),
so trial traffic is never sent anywhere the request itself could not go. A policy that cannot be
parsed allows nothing (fail closed).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TypeVar

from kaiyuan.context import RequestContext
from kaiyuan.providers.base import Provider

POLICY_HEADER = "x-kaiyuan-policy"
_TAG = re.compile(r"^[A-Za-z0-9_.:\-/*]+$")

P = TypeVar("P", bound=Provider)
Terms = tuple[tuple[tuple[bool, str], ...], ...]  # AND of ORs of (negated, tag)


def request_policy(ctx: RequestContext) -> str | None:
    """Every policy that applies to the request, combined with AND (None when there is none)."""
    h = ctx.headers.get(POLICY_HEADER) if ctx.headers is not None and hasattr(ctx.headers, "get") else None
    parts: list[str] = []
    for v in (ctx.policy, ctx.principal.policy, h):
        if isinstance(v, str) and v.strip() and v.strip() not in parts:
            parts.append(v.strip())
    return ",".join(parts) if parts else None


def parse(policy: str) -> Terms | None:
    """The policy's terms; None when it is not valid (callers then allow nothing)."""
    terms = []
    for raw in policy.split(","):
        if not raw.strip():
            continue
        lits = []
        for alt in raw.split("|"):
            alt = alt.strip()
            neg = alt.startswith("!")
            tag = alt[1:].strip() if neg else alt
            if not tag or not _TAG.match(tag):
                return None
            lits.append((neg, tag))
        terms.append(tuple(lits))
    return tuple(terms) if terms else None


def permits(policy: str | None, tags: Iterable[str]) -> bool:
    """Whether a deployment with ``tags`` may receive a request under ``policy``."""
    if policy is None or not policy.strip():
        return True
    terms = parse(policy)
    if terms is None:
        return False
    tagset = frozenset(tags)
    return all(any((tag in tagset) != neg for neg, tag in term) for term in terms)


def allowed(providers: Iterable[P], policy: str | None) -> list[P]:
    """The deployments a request with ``policy`` may reach."""
    return [p for p in providers if permits(policy, p.deployment.tags)]
