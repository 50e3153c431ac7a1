"""Data policy for trial traffic: a shadow or judge call may only go where the original request may.

The request's policy is the first of ``ctx.policy``, ``ctx.principal.policy`` and the header
``x-kaiyuan-policy``. No policy (or ``default`` / ``any``) allows every deployment. Any other value
is a tag the deployment must carry; ``sensitive``, ``self_hosted_only``, ``local_only`` and
``on_prem`` all mean ``self_hosted``. An embedded local deployment counts as ``self_hosted``.
This fails closed: an unknown policy allows only deployments tagged with its name.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

from kaiyuan.context import RequestContext
from kaiyuan.providers.base import Provider

OPEN_POLICIES = frozenset({"", "default", "any", "none", "public"})
ALIASES = {"sensitive": "self_hosted", "self_hosted_only": "self_hosted", "local_only": "self_hosted", "on_prem": "self_hosted"}
POLICY_HEADER = "x-kaiyuan-policy"

P = TypeVar("P", bound=Provider)


def request_policy(ctx: RequestContext) -> str | None:
    for v in (ctx.policy, ctx.principal.policy):
        if v:
            return v
    h = ctx.headers.get(POLICY_HEADER) if ctx.headers is not None and hasattr(ctx.headers, "get") else None
    return h.strip() if isinstance(h, str) and h.strip() else None


def required_tag(policy: str | None) -> str | None:
    """The deployment tag a policy requires, or None when it allows everything."""
    p = (policy or "").strip().lower()
    if p in OPEN_POLICIES:
        return None
    return ALIASES.get(p, p)


def deployment_tags(provider: Provider) -> set[str]:
    tags = set(provider.deployment.tags)
    if getattr(provider.deployment, "provider", None) == "local":
        tags.add("self_hosted")
    return tags


def allowed(providers: Iterable[P], policy: str | None) -> list[P]:
    """The deployments a request with ``policy`` may reach."""
    tag = required_tag(policy)
    return [p for p in providers if tag is None or tag in deployment_tags(p)]


def may_mirror(providers: Sequence[Provider], policy: str | None) -> bool:
    return bool(allowed(providers, policy))
