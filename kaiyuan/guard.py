"""The guard stage: who is calling (auth), and may they make this call (limits, budgets).

The gateway calls ``admit`` before routing and ``settle`` once the request has ended (success,
failure or cancellation), so reservations are always released. The default guard knows one
optional master key; ``kaiyuan.accounting`` and ``kaiyuan.limits`` provide the full one.
"""

from __future__ import annotations

import hmac
from typing import Protocol

from kaiyuan.context import Principal, RequestContext
from kaiyuan.errors import ErrorKind, GatewayError


class Guard(Protocol):
    async def admit(self, ctx: RequestContext) -> None: ...

    async def settle(self, ctx: RequestContext) -> None: ...

    async def close(self) -> None: ...


def bearer_token(headers: object) -> str | None:
    """The caller's key, from ``Authorization: Bearer`` (OpenAI SDK) or ``x-api-key`` (Anthropic SDK)."""
    get = getattr(headers, "get", None)
    if get is None:
        return None
    auth = get("Authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    key = get("x-api-key")
    return key.strip() if key else None


class MasterKeyGuard:
    """No key configured: open (single-user, zero-config). A master key: every call must carry it."""

    def __init__(self, master_key: str | None) -> None:
        self.master_key = master_key
        self._admin = Principal(key_id="master", is_admin=True)

    async def admit(self, ctx: RequestContext) -> None:
        if self.master_key is None:
            return
        token = bearer_token(ctx.headers)
        if token is None:
            raise GatewayError(
                ErrorKind.AUTHENTICATION,
                "missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
                code="missing_api_key",
            )
        if not hmac.compare_digest(token.encode(), self.master_key.encode()):
            raise GatewayError(ErrorKind.AUTHENTICATION, "invalid API key", code="invalid_api_key")
        ctx.principal = self._admin

    async def settle(self, ctx: RequestContext) -> None:
        return None

    async def close(self) -> None:
        return None
