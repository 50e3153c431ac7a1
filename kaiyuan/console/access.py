"""Who may read or change what through the admin API and the console: the one rule.

A caller is a :class:`Viewer`: an admin (the master key, an admin-scoped virtual key, an OIDC
admin) or a team (a virtual key, an OIDC user mapped to a team) that sees only its own team's data
(a key without a team: only its own requests). Callers prove who they are with a bearer token or a
console session cookie; a cookie caller must also send the session's CSRF token on every change.
With no master key the admin API and the console are closed.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass

from aiohttp import web
from sqlalchemy import Engine, select

from kaiyuan.accounting import keystore
from kaiyuan.accounting.auth import bearer_token
from kaiyuan.console.session import COOKIE, Session, Sessions
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.server.openai_api import GATEWAY_KEY
from kaiyuan.store.schema import api_keys, teams

SESSIONS_KEY: web.AppKey[Sessions] = web.AppKey("console_sessions", Sessions)
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Viewer:
    role: str  # "admin" | "team"
    name: str
    via: str  # "master" | "key" | "oidc"
    team_id: str | None = None
    key_id: str | None = None
    session: Session | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


VIEWER: web.RequestKey[Viewer] = web.RequestKey("kaiyuan_viewer", Viewer)  # who an admin handler runs for


def _denied(status: int, message: str, code: str) -> GatewayError:
    kind = ErrorKind.AUTHENTICATION if status == 401 else ErrorKind.PERMISSION
    return GatewayError(kind, message, status=status, code=code)


def sessions(app: web.Application) -> Sessions | None:
    """The app's session signer; None without a master key (then there are no sessions)."""
    return app.get(SESSIONS_KEY)


def _key_viewer(engine: Engine, token: str) -> Viewer | None:
    """An active virtual key as a Viewer (admin-scoped keys are admins), else None."""
    if not keystore.looks_like_key(token):
        return None
    with engine.connect() as conn:
        row = conn.execute(select(api_keys).where(api_keys.c.key_hash == keystore.hash_key(token))).mappings().first()
    if row is None or keystore.key_status(row, time.time()) != "active":
        return None
    return Viewer("admin" if row["admin"] else "team", row["name"], "key", row["team_id"], row["id"])


async def viewer_for_token(request: web.Request, token: str) -> Viewer | None:
    """The master key or an active virtual key; None for anything else."""
    gw = request.app[GATEWAY_KEY]
    master = gw.config.server.master_key
    if master is not None and hmac.compare_digest(token.encode(), master.encode()):
        return Viewer("admin", "master key", "master")
    if gw.engine is None:
        return None
    return await asyncio.to_thread(_key_viewer, gw.engine, token)


async def _still_valid(request: web.Request, s: Session) -> bool:
    """A session made from a key ends when the key is revoked or expires; an OIDC team when the team goes."""
    engine = request.app[GATEWAY_KEY].engine
    if engine is None or s.via == "master":
        return True

    def check() -> bool:
        with engine.connect() as conn:
            if s.via == "key":
                row = conn.execute(select(api_keys).where(api_keys.c.id == s.key_id)).mappings().first()
                return row is not None and keystore.key_status(row, time.time()) == "active"
            if s.team_id is not None:
                return conn.execute(select(teams.c.id).where(teams.c.id == s.team_id)).first() is not None
            return True

    return await asyncio.to_thread(check)


async def session_viewer(request: web.Request) -> Viewer | None:
    signer = sessions(request.app)
    if signer is None:
        return None
    s = signer.read(request.cookies.get(COOKIE))
    if s is None or not await _still_valid(request, s):
        return None
    return Viewer(s.role, s.name, s.via, s.team_id, s.key_id, s)


def check_csrf(request: web.Request, viewer: Viewer, sent: str | None = None) -> None:
    """A cookie-authenticated change must carry the session's CSRF token (header or form field)."""
    if viewer.session is None or request.method in SAFE_METHODS:
        return
    token = sent if sent is not None else request.headers.get(CSRF_HEADER)
    if not token or not hmac.compare_digest(token, viewer.session.csrf):
        raise _denied(403, f"missing or wrong CSRF token: send the console's token in the {CSRF_HEADER} header", "csrf_failed")


async def authorize(request: web.Request, *, team_ok: bool = False) -> Viewer:
    """The admin API's rule. ``team_ok``: the route also serves team viewers (their own data only)."""
    gw = request.app[GATEWAY_KEY]
    if gw.config.server.master_key is None or gw.engine is None:
        raise _denied(403, "the admin API is off: set server.master_key (and a store) in the config", "admin_disabled")
    token = bearer_token(request.headers)
    viewer: Viewer | None
    if token is not None:
        viewer = await viewer_for_token(request, token)
        if viewer is None:
            raise _denied(401, "invalid key: the admin API takes the master key, an admin-scoped key or, for its "
                               "read-only data, a team's virtual key", "invalid_api_key")
    elif COOKIE in request.cookies:
        viewer = await session_viewer(request)
        if viewer is None:
            raise _denied(401, "the console session has expired or was signed out: sign in again at /ui/login", "session_expired")
        check_csrf(request, viewer)
    else:
        raise _denied(401, "the admin API needs a key: 'Authorization: Bearer <master key>'", "missing_api_key")
    if not viewer.is_admin and not team_ok:
        raise _denied(403, "this needs the master key or an admin-scoped key; a team's key may only read its own data",
                      "admin_required")
    request[VIEWER] = viewer
    return viewer
