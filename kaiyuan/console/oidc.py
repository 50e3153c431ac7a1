"""OpenID Connect single sign-on for the console: authorization code flow with PKCE.

``/ui/oidc/start`` sends the browser to the provider with a fresh state, nonce and PKCE verifier
(kept in a signed, 10-minute, HttpOnly cookie); ``/ui/oidc/callback`` checks the state, trades the
code for tokens (client secret over HTTP Basic), verifies the ID token's signature against the
provider's JWKS (PyJWT), its issuer, audience, expiry and nonce, then maps a claim to an admin or a
team. A user who maps to neither is refused. Discovery and keys are fetched once per process and
refetched when a token names an unknown key.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
import jwt
from aiohttp import web
from sqlalchemy import or_, select

from kaiyuan.console.access import Viewer, sessions
from kaiyuan.console.pages import _safe_next, redirect, render, start_session
from kaiyuan.console.settings import OIDCSettings
from kaiyuan.server.openai_api import GATEWAY_KEY
from kaiyuan.store.schema import teams

FLOW_COOKIE = "kaiyuan_oidc"
FLOW_TTL_S = 600
TIMEOUT = aiohttp.ClientTimeout(total=10)
ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]


class OIDCError(Exception):
    """Sign-in failed; the message is shown to the user."""


@dataclass
class Provider:
    settings: OIDCSettings
    meta: dict[str, Any] = field(default_factory=dict)
    keys: jwt.PyJWKSet | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def _get(self, url: str) -> Any:
        try:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.get(url) as r:
                if r.status != 200:
                    raise OIDCError(f"the identity provider answered {r.status} for {url}")
                return await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise OIDCError(f"cannot reach the identity provider at {url}: {e}") from None

    async def discover(self) -> dict[str, Any]:
        async with self.lock:
            if not self.meta:
                meta = await self._get(self.settings.issuer + "/.well-known/openid-configuration")
                for k in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                    if not isinstance(meta.get(k), str):
                        raise OIDCError(f"the provider's discovery document has no {k}")
                if meta.get("issuer", "").rstrip("/") != self.settings.issuer:
                    raise OIDCError(f"the provider says its issuer is {meta.get('issuer')!r}, not {self.settings.issuer!r}")
                self.meta = meta
            return self.meta

    async def signing_key(self, token: str) -> Any:
        kid = jwt.get_unverified_header(token).get("kid")
        for attempt in range(2):
            if self.keys is None or attempt:
                self.keys = jwt.PyJWKSet.from_dict(await self._get((await self.discover())["jwks_uri"]))
            for k in self.keys.keys:
                if kid is None or k.key_id == kid:
                    return k.key
        raise OIDCError("the ID token is signed with a key the provider does not publish")


PROVIDER_KEY: web.AppKey[Provider] = web.AppKey("console_oidc", Provider)


def _challenge(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def _redirect_uri(request: web.Request, s: OIDCSettings) -> str:
    return s.redirect_url or f"{request.scheme}://{request.host}/ui/oidc/callback"


def _provider(request: web.Request) -> Provider | None:
    return request.app.get(PROVIDER_KEY)


async def start(request: web.Request) -> web.StreamResponse:
    p, signer = _provider(request), sessions(request.app)
    if p is None or signer is None:
        return render("off.html", 404)
    try:
        meta = await p.discover()
    except OIDCError as e:
        return render("login_error.html", 502, message=str(e))
    flow = {"state": secrets.token_urlsafe(24), "nonce": secrets.token_urlsafe(24), "verifier": secrets.token_urlsafe(48),
            "next": _safe_next(request.query.get("next"))}
    params = {"response_type": "code", "client_id": p.settings.client_id, "redirect_uri": _redirect_uri(request, p.settings),
              "scope": " ".join(p.settings.scopes), "state": flow["state"], "nonce": flow["nonce"],
              "code_challenge": _challenge(flow["verifier"]), "code_challenge_method": "S256"}
    if request.query.get("login_hint"):
        params["login_hint"] = request.query["login_hint"][:200]
    resp = redirect(meta["authorization_endpoint"] + ("&" if "?" in meta["authorization_endpoint"] else "?") + urlencode(params))
    # SameSite=Lax: the provider's redirect back is a top-level cross-site GET, which Strict would drop
    resp.set_cookie(FLOW_COOKIE, signer.seal(flow, FLOW_TTL_S), httponly=True, samesite="Lax", path="/ui/oidc",
                    max_age=FLOW_TTL_S, secure=request.app[GATEWAY_KEY].config.console.secure_cookies)
    return resp


async def _exchange(p: Provider, request: web.Request, code: str, verifier: str) -> str:
    meta = await p.discover()
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": _redirect_uri(request, p.settings),
            "code_verifier": verifier}
    auth = aiohttp.BasicAuth(p.settings.client_id, p.settings.client_secret)
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.post(meta["token_endpoint"], data=form, auth=auth) as r:
            body = await r.json(content_type=None)
            if r.status != 200 or not isinstance(body, dict):
                why = body.get("error_description") or body.get("error") if isinstance(body, dict) else None
                raise OIDCError(f"the identity provider refused the sign-in code ({r.status}: {why or 'no reason'})")
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        raise OIDCError(f"cannot reach the identity provider's token endpoint: {e}") from None
    token = body.get("id_token")
    if not isinstance(token, str):
        raise OIDCError("the identity provider sent no ID token (is 'openid' in console.oidc.scopes?)")
    return token


async def verify(p: Provider, token: str, nonce: str) -> dict[str, Any]:
    try:
        key = await p.signing_key(token)
        claims = jwt.decode(token, key, algorithms=ALGORITHMS, audience=p.settings.client_id, issuer=p.settings.issuer,
                            options={"require": ["exp", "iat", "iss", "aud", "sub"]}, leeway=30)
    except jwt.PyJWTError as e:
        raise OIDCError(f"the ID token is not valid: {e}") from None
    if claims.get("nonce") != nonce:
        raise OIDCError("the ID token's nonce does not match this sign-in")
    return dict(claims)


def _values(claim: Any) -> list[str]:
    if isinstance(claim, str):
        return [claim]
    if isinstance(claim, list):
        return [x for x in claim if isinstance(x, str)]
    return []


async def map_claims(request: web.Request, s: OIDCSettings, claims: dict[str, Any]) -> Viewer:
    name = str(claims.get("email") or claims.get("preferred_username") or claims["sub"])[:200]
    if set(_values(claims.get(s.admin_claim))) & set(s.admin_values):
        return Viewer("admin", name, "oidc")
    wanted = _values(claims.get(s.team_claim)) if s.team_claim else []
    engine = request.app[GATEWAY_KEY].engine
    if wanted and engine is not None:

        def find() -> str | None:
            with engine.connect() as conn:
                row = conn.execute(select(teams.c.id).where(or_(teams.c.id == wanted[0], teams.c.name == wanted[0]))).first()
                return None if row is None else str(row[0])

        team_id = await asyncio.to_thread(find)
        if team_id is not None:
            return Viewer("team", name, "oidc", team_id)
        raise OIDCError(f"{name} belongs to team {wanted[0]!r}, which this gateway does not have")
    raise OIDCError(f"{name} is neither an admin ({s.admin_claim} has none of {', '.join(s.admin_values)}) "
                    f"nor in a team ({s.team_claim or 'no team claim configured'})")


async def callback(request: web.Request) -> web.StreamResponse:
    p, signer = _provider(request), sessions(request.app)
    if p is None or signer is None:
        return render("off.html", 404)
    flow = signer.unseal(request.cookies.get(FLOW_COOKIE))
    q = request.query
    try:
        if flow is None or not secrets.compare_digest(q.get("state", ""), flow["state"]):
            raise OIDCError("this sign-in expired or was not started here; start again")
        if q.get("error"):
            raise OIDCError(f"the identity provider said: {q.get('error_description') or q['error']}")
        if not q.get("code"):
            raise OIDCError("the identity provider sent no code")
        token = await _exchange(p, request, q["code"], flow["verifier"])
        viewer = await map_claims(request, p.settings, await verify(p, token, flow["nonce"]))
    except OIDCError as e:
        resp = render("login_error.html", 403, message=str(e))
        resp.del_cookie(FLOW_COOKIE, path="/ui/oidc")
        return resp
    resp = start_session(request, viewer, flow["next"])
    resp.del_cookie(FLOW_COOKIE, path="/ui/oidc")
    return resp


def add_routes(app: web.Application) -> None:
    settings = app[GATEWAY_KEY].config.console.oidc
    if settings is None:
        return
    app[PROVIDER_KEY] = Provider(settings)
    app.router.add_get("/ui/oidc/start", start)
    app.router.add_get("/ui/oidc/callback", callback)
