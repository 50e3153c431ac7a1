"""A small OpenID Connect provider for the console's SSO tests, run as its own process.

    python -m kaiyuan.testing.fake_oidc --port 0 --client-id ID --client-secret S --users users.json

It publishes discovery and a JWKS (a fresh RSA key per run, made with ``cryptography``), signs
users in without a password (the ``login_hint`` names the user; an unknown one is refused with
``access_denied``), and issues RS256 ID tokens by the authorization-code flow with PKCE (S256) and
the client secret over HTTP Basic, as an OIDC provider must. A user's ``tamper`` field makes the
token wrong on purpose: ``signature`` (signed by another key), ``nonce``, ``audience``, ``expired``,
``issuer``. It prints ``ready <issuer URL>`` once it is listening.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import secrets
import sys
import time
from typing import Any
from urllib.parse import urlencode

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

KID = "fake-oidc-1"


def _rsa() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Provider:
    def __init__(self, client_id: str, client_secret: str, users: dict[str, dict[str, Any]]) -> None:
        self.client_id, self.client_secret, self.users = client_id, client_secret, users
        self.key, self.other_key = _rsa(), _rsa()
        self.codes: dict[str, dict[str, Any]] = {}
        self.issuer = ""

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [{**jwk, "kid": KID, "use": "sig", "alg": "RS256"}]}

    async def discovery(self, _r: web.Request) -> web.Response:
        i = self.issuer
        return web.json_response({"issuer": i, "authorization_endpoint": i + "/authorize", "token_endpoint": i + "/token",
                                  "jwks_uri": i + "/jwks", "response_types_supported": ["code"],
                                  "id_token_signing_alg_values_supported": ["RS256"], "code_challenge_methods_supported": ["S256"]})

    async def keys(self, _r: web.Request) -> web.Response:
        return web.json_response(self.jwks())

    async def authorize(self, r: web.Request) -> web.StreamResponse:
        q = r.query
        if q.get("client_id") != self.client_id or q.get("response_type") != "code" or not q.get("redirect_uri"):
            return web.Response(status=400, text="bad authorization request")
        back = q["redirect_uri"]
        user = self.users.get(q.get("login_hint", ""))
        if user is None:
            raise web.HTTPFound(back + "?" + urlencode({"error": "access_denied", "error_description": "no such user",
                                                       "state": q.get("state", "")}))
        code = secrets.token_urlsafe(16)
        self.codes[code] = {"user": user, "nonce": q.get("nonce"), "challenge": q.get("code_challenge"), "redirect_uri": back}
        raise web.HTTPFound(back + "?" + urlencode({"code": code, "state": q.get("state", "")}))

    async def token(self, r: web.Request) -> web.Response:
        auth = r.headers.get("Authorization", "")
        want = "Basic " + base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if not secrets.compare_digest(auth, want):
            return web.json_response({"error": "invalid_client"}, status=401)
        form = await r.post()
        grant = self.codes.pop(str(form.get("code", "")), None)
        if grant is None or form.get("redirect_uri") != grant["redirect_uri"]:
            return web.json_response({"error": "invalid_grant"}, status=400)
        verifier = str(form.get("code_verifier", ""))
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if challenge != grant["challenge"]:
            return web.json_response({"error": "invalid_grant", "error_description": "PKCE verifier mismatch"}, status=400)
        return web.json_response({"id_token": self.id_token(grant), "access_token": secrets.token_urlsafe(16), "token_type": "Bearer"})

    def id_token(self, grant: dict[str, Any]) -> str:
        user, tamper = grant["user"], grant["user"].get("tamper")
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": self.client_id, "iat": now, "exp": now + 300, "nonce": grant["nonce"], **user["claims"]}
        if tamper == "nonce":
            claims["nonce"] = "not-the-nonce"
        elif tamper == "audience":
            claims["aud"] = "someone-else"
        elif tamper == "expired":
            claims["iat"], claims["exp"] = now - 7200, now - 3600
        elif tamper == "issuer":
            claims["iss"] = "https://evil.example"
        key = self.other_key if tamper == "signature" else self.key
        return jwt.encode(claims, key, algorithm="RS256", headers={"kid": KID})


async def serve(port: int, provider: Provider) -> None:
    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", provider.discovery)
    app.router.add_get("/jwks", provider.keys)
    app.router.add_get("/authorize", provider.authorize)
    app.router.add_post("/token", provider.token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    server: Any = site._server
    provider.issuer = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    print(f"ready {provider.issuer}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--client-id", required=True)
    ap.add_argument("--client-secret", required=True)
    ap.add_argument("--users", required=True, help="JSON file: {login: {claims: {...}, tamper: ...}}")
    a = ap.parse_args()
    with open(a.users, encoding="utf-8") as f:
        users = json.load(f)
    try:
        asyncio.run(serve(a.port, Provider(a.client_id, a.client_secret, users)))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
