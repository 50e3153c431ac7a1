"""The /ui pages: sign-in and sign-out, overview, traffic, request detail, trials, keys.

Server-rendered with Jinja2 (autoescape on: request-log contents are attacker-controlled), under a
Content-Security-Policy that allows only this origin's scripts, so nothing in a page can run
inline. Each page asks the same data functions the admin API serves (kaiyuan.console.api);
every change a page offers is a call to the admin API made by static/console.js.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from kaiyuan.console import api, data
from kaiyuan.console.access import CSRF_HEADER, Viewer, check_csrf, session_viewer, sessions, viewer_for_token
from kaiyuan.console.session import COOKIE, LOGIN_COOKIE
from kaiyuan.errors import GatewayError
from kaiyuan.server.openai_api import GATEWAY_KEY

STATIC = Path(__file__).parent / "static"
_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("kaiyuan.console", "templates"), autoescape=True, undefined=jinja2.StrictUndefined
)
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
Page = Callable[[web.Request, Viewer], Awaitable[web.StreamResponse]]


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _num(v: Any, digits: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and digits:
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else f"{v:,.0f}" if isinstance(v, float) else str(v)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


_ENV.filters.update(when=_when, num=_num, pct=_pct, usd=lambda v: "-" if v is None else f"${v:,.4f}")


def render(template: str, status: int = 200, **ctx: Any) -> web.Response:
    html = _ENV.get_template(template).render(**ctx)
    return web.Response(text=html, status=status, content_type="text/html", headers=HEADERS)


def redirect(to: str) -> web.Response:
    return web.Response(status=303, headers={**HEADERS, "Location": to})


def _safe_next(v: str | None) -> str:
    """Only a console path: never another site (no open redirect)."""
    if v and v.startswith("/ui/") and "//" not in v and "\\" not in v:
        return v
    return "/ui/overview"


def page(handler: Page) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A signed-in page: no session, no page (a redirect to the sign-in form, with no data)."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        if request.app[GATEWAY_KEY].config.server.master_key is None:
            return render("off.html", 403)
        viewer = await session_viewer(request)
        if viewer is None:
            return redirect(f"/ui/login?next={request.path}")
        try:
            return await handler(request, viewer)
        except GatewayError as e:
            return error_page(viewer, e.status, e.message)

    return wrapped


def admin_page(handler: Page) -> Page:
    async def wrapped(request: web.Request, viewer: Viewer) -> web.StreamResponse:
        if not viewer.is_admin:
            return error_page(viewer, 403, "this page is for admins; your key sees its own team's data")
        return await handler(request, viewer)

    return wrapped


def _common(viewer: Viewer, nav: str, **ctx: Any) -> dict[str, Any]:
    assert viewer.session is not None
    return {"viewer": viewer, "nav": nav, "csrf": viewer.session.csrf, "csrf_header": CSRF_HEADER, **ctx}


def error_page(viewer: Viewer, status: int, message: str) -> web.Response:
    return render("error.html", status, **_common(viewer, "", message=message))


# -- sign in / out ----------------------------------------------------------------------------------
async def login_form(request: web.Request, error: str | None = None, status: int = 200) -> web.StreamResponse:
    cfg = request.app[GATEWAY_KEY].config
    signer = sessions(request.app)
    if signer is None:
        return render("off.html", 403)
    nonce = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(24)
    resp = render("login.html", status, token=signer.login_token(nonce), error=error, next=_safe_next(request.query.get("next")),
                  oidc=cfg.console.oidc)
    resp.set_cookie(LOGIN_COOKIE, nonce, httponly=True, samesite="Strict", path="/ui", max_age=3600,
                    secure=cfg.console.secure_cookies)
    return resp


async def login_page(request: web.Request) -> web.StreamResponse:
    return await login_form(request)


async def login_submit(request: web.Request) -> web.StreamResponse:
    signer = sessions(request.app)
    if signer is None:
        return render("off.html", 403)
    form = await request.post()
    if not signer.check_login_token(request.cookies.get(LOGIN_COOKIE), form.get("csrf")):
        return await login_form(request, "the form expired or did not come from this page; try again", 403)
    key = form.get("key")
    viewer = await viewer_for_token(request, key.strip()) if isinstance(key, str) and key.strip() else None
    if viewer is None:
        await asyncio.sleep(0.25)  # a little friction for guessing
        return await login_form(request, "that key is not valid here (the master key, or an active virtual key)", 401)
    nxt = form.get("next")
    return start_session(request, viewer, _safe_next(nxt if isinstance(nxt, str) else None))


def start_session(request: web.Request, viewer: Viewer, to: str) -> web.Response:
    signer = sessions(request.app)
    assert signer is not None
    _, cookie = signer.issue(viewer.role, viewer.name, viewer.via, viewer.team_id, viewer.key_id)
    resp = redirect(to)
    resp.set_cookie(COOKIE, cookie, httponly=True, samesite="Strict", path="/", max_age=int(signer.ttl_s),
                    secure=request.app[GATEWAY_KEY].config.console.secure_cookies)
    resp.del_cookie(LOGIN_COOKIE, path="/ui")
    return resp


async def logout(request: web.Request) -> web.StreamResponse:
    viewer = await session_viewer(request)
    signer = sessions(request.app)
    if viewer is not None and signer is not None and viewer.session is not None:
        form = await request.post()
        sent = form.get("csrf")
        try:
            check_csrf(request, viewer, sent if isinstance(sent, str) else "")
        except GatewayError as e:
            return error_page(viewer, e.status, e.message)
        signer.revoke(viewer.session)
    resp = redirect("/ui/login")
    resp.del_cookie(COOKIE, path="/")
    return resp


# -- pages ------------------------------------------------------------------------------------------
@page
async def overview(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    ov = await api.overview_for(request, viewer)
    return render("overview.html", **_common(viewer, "overview", ov=ov, periods=list(data.PERIODS)))


@page
async def traffic(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    tr = await api.traffic_for(request, viewer)
    log = await api.requests_for(request, viewer)
    st = api.state(request)
    breakers = request.app[GATEWAY_KEY].router.describe() if viewer.is_admin else []
    failures = await asyncio.to_thread(data.recent_failures, st.engine, api.scope_for(viewer))
    q = {k: request.query.get(k, "") for k in ("key_id", "team_id", "model", "status")}
    return render("traffic.html", **_common(viewer, "traffic", tr=tr, log=log, breakers=breakers, failures=failures, q=q,
                                            periods=list(data.PERIODS), period=tr["period"]))


@page
async def request_detail(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    row = await api.request_for(request, viewer)
    return render("request.html", **_common(viewer, "traffic", r=row))


@page
async def keys(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    kb = await api.keys_for(request, viewer)
    models = sorted(request.app[GATEWAY_KEY].models)
    return render("keys.html", **_common(viewer, "keys", kb=kb, models=models))


async def root(_request: web.Request) -> web.StreamResponse:
    return redirect("/ui/overview")


async def static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        raise web.HTTPNotFound()
    return web.FileResponse(STATIC / name, headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})


STATIC_FILES = frozenset({"uPlot.iife.min.js", "uPlot.min.css", "console.js", "console.css"})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/ui", root)
    r.add_get("/ui/", root)
    r.add_get("/ui/login", login_page)
    r.add_post("/ui/login", login_submit)
    r.add_post("/ui/logout", logout)
    r.add_get("/ui/overview", overview)
    r.add_get("/ui/traffic", traffic)
    r.add_get("/ui/requests/{id}", request_detail)
    r.add_get("/ui/keys", keys)
    r.add_get("/ui/static/{name}", static)
