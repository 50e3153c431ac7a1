"""Data policy for trial traffic: a shadow, judge or replay call may only go where the original
request may go.

The router's data-policy language (``kaiyuan.routing.policy``, parsed by it): a comma-separated list
of terms that must all hold; a term is a tag the deployment must carry (``self_hosted``), a tag it
must not carry (``!vendor:openai``), or alternatives separated by ``|`` (``region:eu|self_hosted``).
The request's policies - ``ctx.policy`` (set by the router: key, header and model policies
combined), ``ctx.principal.policy`` and the ``x-kaiyuan-policy`` header - are ALL applied (AND),
so trial traffic is never sent anywhere the request itself could not go. A policy that cannot be
parsed allows nothing (fail closed).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from typing import TypeVar

from kaiyuan.context import RequestContext
from kaiyuan.providers.base import Provider
from kaiyuan.routing.policy import POLICY_HEADER, Policy, parse_policy

P = TypeVar("P", bound=Provider)


@lru_cache(maxsize=1024)
def _parse(text: str) -> Policy:
    return parse_policy(text)


def request_policy(ctx: RequestContext) -> str | None:
    """Every policy that applies to the request, combined with AND (None when there is none)."""
    h = ctx.headers.get(POLICY_HEADER) if ctx.headers is not None and hasattr(ctx.headers, "get") else None
    parts: list[str] = []
    for v in (ctx.policy, ctx.principal.policy, h):
        if isinstance(v, str) and v.strip() and v.strip() not in parts:
            parts.append(v.strip())
    return ",".join(parts) if parts else None


def permits(policy: str | None, tags: Iterable[str]) -> bool:
    """Whether a deployment with ``tags`` may receive a request under ``policy`` (invalid: never)."""
    if policy is None or not policy.strip():
        return True
    try:
        pol = _parse(policy)
    except ValueError:
        return False
    return pol.allows(frozenset(tags))


def allowed(providers: Iterable[P], policy: str | None) -> list[P]:
    """The deployments a request with ``policy`` may reach."""
    return [p for p in providers if permits(policy, p.deployment.tags)]
