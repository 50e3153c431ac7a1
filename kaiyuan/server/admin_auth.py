"""The one auth rule of every ``/admin/*`` route (keys, teams, budgets, spend, deployments, trials).

The master key, as a bearer token; with no master key configured every admin route is closed
(403 ``admin_disabled``). The rule itself is :meth:`kaiyuan.accounting.auth.Authenticator.require_admin`;
each admin module calls :func:`require_admin` first and answers its errors in the OpenAI shape.
"""

from __future__ import annotations

from aiohttp import web

from kaiyuan.pipeline import GATEWAY_KEY


def require_admin(request: web.Request) -> None:
    """Raise the 401/403 the caller gets unless it holds the master key."""
    request.app[GATEWAY_KEY].auth.require_admin(request.headers)
