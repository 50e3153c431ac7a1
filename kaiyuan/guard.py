"""The guard stage: who is calling (auth), and may they make this call (limits, budgets).

The gateway calls ``admit`` before routing and ``settle`` once the request has ended (success,
failure or cancellation), so reservations are always released. The implementation is
``kaiyuan.accounting.guard.KeyGuard`` (master key, virtual keys, limits, budgets, cost).
"""

from __future__ import annotations

from typing import Protocol

from kaiyuan.context import RequestContext


class Guard(Protocol):
    async def admit(self, ctx: RequestContext) -> None: ...

    async def settle(self, ctx: RequestContext) -> None: ...

    async def close(self) -> None: ...


def bearer_token(headers: object) -> str | None:
    """The caller's key, from ``Authorization: Bearer`` (OpenAI SDK), ``x-api-key`` (Anthropic SDK) or
    ``x-goog-api-key`` (Gemini SDKs; the Gemini routes also move a ``?key=`` query parameter there)."""
    get = getattr(headers, "get", None)
    if get is None:
        return None
    auth = get("Authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    key = get("x-api-key") or get("x-goog-api-key")
    return key.strip() if key else None
