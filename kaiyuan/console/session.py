"""Signed cookie sessions for the console: HttpOnly, SameSite=Strict, with a CSRF token inside.

The cookie holds ``base64url(json).base64url(hmac_sha256)``; nothing is stored server-side except
the ids of signed-out sessions (bounded, per replica, kept until they would have expired anyway).
The signing secret is ``console.session_secret`` or, by default, derived from the master key, so
every replica accepts every replica's cookies and rotating the master key ends all sessions.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import orjson

COOKIE = "kaiyuan_session"
LOGIN_COOKIE = "kaiyuan_login"  # the pre-session nonce of the sign-in form's CSRF token
MAX_REVOKED = 100_000


@dataclass(frozen=True)
class Session:
    sid: str
    role: str  # "admin" | "team"
    name: str  # who, for the page header: "master key", a key's name, an OIDC email
    via: str  # "master" | "key" | "oidc"
    team_id: str | None
    key_id: str | None
    csrf: str
    exp: float


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def derive_secret(configured: str | None, master_key: str) -> bytes:
    if configured:
        return configured.encode()
    return hmac.new(master_key.encode(), b"kaiyuan console session v1", hashlib.sha256).digest()


class Sessions:
    def __init__(self, secret: bytes, ttl_s: float) -> None:
        self._secret = secret
        self.ttl_s = ttl_s
        self._revoked: OrderedDict[str, float] = OrderedDict()

    def _sign(self, data: bytes) -> str:
        return _b64(hmac.new(self._secret, data, hashlib.sha256).digest())

    def _verified(self, text: str | None) -> bytes | None:
        """The body of a ``<body>.<signature>`` value this gateway signed, or None (missing, malformed,
        too long, or a signature that does not match)."""
        if not text or text.count(".") != 1 or len(text) > 4096:
            return None
        body_s, sig = text.split(".")
        try:
            body = _unb64(body_s)
        except ValueError:
            return None
        return body if hmac.compare_digest(sig, self._sign(body)) else None

    def issue(self, role: str, name: str, via: str, team_id: str | None = None, key_id: str | None = None) -> tuple[Session, str]:
        s = Session(secrets.token_urlsafe(16), role, name, via, team_id, key_id, secrets.token_urlsafe(24), time.time() + self.ttl_s)
        body = orjson.dumps(asdict(s))
        return s, f"{_b64(body)}.{self._sign(body)}"

    def read(self, cookie: str | None) -> Session | None:
        """The session in a cookie, or None when it is missing, forged, expired or signed out."""
        body = self._verified(cookie)
        if body is None:
            return None
        try:
            s = Session(**orjson.loads(body))
        except (orjson.JSONDecodeError, TypeError):
            return None
        if s.exp <= time.time() or s.sid in self._revoked:
            return None
        return s

    def revoke(self, s: Session) -> None:
        now = time.time()
        while self._revoked and (len(self._revoked) >= MAX_REVOKED or next(iter(self._revoked.values())) <= now):
            self._revoked.popitem(last=False)
        self._revoked[s.sid] = s.exp

    # -- short-lived signed values (the OIDC state, nonce and PKCE verifier between redirect and callback)
    def seal(self, value: dict[str, Any], ttl_s: float) -> str:
        body = orjson.dumps({**value, "_exp": time.time() + ttl_s, "_kind": "seal"})
        return f"{_b64(body)}.{self._sign(body)}"

    def unseal(self, text: str | None) -> dict[str, Any] | None:
        body = self._verified(text)
        if body is None:
            return None
        value = orjson.loads(body)
        if not isinstance(value, dict) or value.get("_kind") != "seal" or value.get("_exp", 0) <= time.time():
            return None
        return value

    # -- the sign-in form's CSRF token: a nonce cookie and its MAC in a hidden field --------------
    def login_token(self, nonce: str) -> str:
        return self._sign(b"login:" + nonce.encode())

    def check_login_token(self, nonce: str | None, token: Any) -> bool:
        return bool(nonce) and isinstance(token, str) and hmac.compare_digest(token, self.login_token(nonce or ""))
