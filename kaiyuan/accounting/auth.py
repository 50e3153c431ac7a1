"""Who is calling a model route: the master key or a virtual key (the admin API's rule, built on
:func:`bearer_token` here, is :func:`kaiyuan.console.access.authorize`).

Authentication reads only the request's headers, so the pipeline runs it before it reads a body.
Virtual keys are cached in memory for ``limits.key_cache_ttl_s`` (unknown keys for at most
``NEGATIVE_TTL_S``); concurrent misses on one key share one database read (:class:`SingleFlight`);
with Redis, an admin change on any replica drops the cached key everywhere at once (pub/sub).

Open mode (no ``server.master_key``): model routes take any caller, and every ``/admin/*`` route
is closed (``console.access.authorize``), because an admin API nobody can authenticate to must not
be one everybody can use.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable, Hashable
from datetime import UTC, datetime
from typing import Any, TypeVar

from prometheus_client import Counter
from sqlalchemy import Engine

from kaiyuan.accounting import keystore
from kaiyuan.accounting.keystore import KeyRecord
from kaiyuan.context import Principal, RequestContext
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.limits.shared import SharedCounters
from kaiyuan.store.boundary import call

log = logging.getLogger("kaiyuan.auth")

NEGATIVE_TTL_S = 2.0
KEY_CACHE_MAX = 100_000  # a flood of random keys cannot grow the cache forever
INVALIDATE_CHANNEL = "ky:invalidate"
ADMIN = Principal(key_id="master", is_admin=True)
T = TypeVar("T")
Cached = tuple[KeyRecord, Principal]  # a virtual key's record and the principal its requests carry


def bearer_token(headers: Any) -> str | None:
    """The caller's key, from ``Authorization: Bearer`` (OpenAI SDK), ``x-api-key`` (Anthropic SDK)
    or ``x-goog-api-key`` (Gemini SDKs; the Gemini routes also move a ``?key=`` query parameter
    there); ``None`` when none is sent. A header that is sent but holds no usable key
    (empty once stripped, another scheme, bytes that are not UTF-8) is a 401, never a match."""
    auth = headers.get("Authorization")
    if auth is not None:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer":
            raise _unauthenticated("the Authorization header must be 'Bearer <key>'", "invalid_api_key")
        return _usable(token)
    key = headers.get("x-api-key")
    if key is None:
        key = headers.get("x-goog-api-key")
    return None if key is None else _usable(key)


def _usable(token: str) -> str:
    token = token.strip()
    if not token:
        raise _unauthenticated("the API key is empty: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
                               "invalid_api_key")
    try:
        token.encode()
    except UnicodeEncodeError:  # aiohttp keeps undecodable header bytes as surrogates
        raise _unauthenticated("the API key header is not valid UTF-8", "invalid_api_key") from None
    return token


def _unauthenticated(message: str, code: str) -> GatewayError:
    return GatewayError(ErrorKind.AUTHENTICATION, message, code=code)


def _matches(token: str, secret: str) -> bool:
    return hmac.compare_digest(token.encode(), secret.encode())


class SingleFlight:
    """Concurrent callers asking for the same key share one blocking load (run in a thread)."""

    def __init__(self) -> None:
        self._inflight: dict[Hashable, asyncio.Future[Any]] = {}

    async def run(self, key: Hashable, fn: Callable[..., T], *args: Any) -> T:
        fut = self._inflight.get(key)
        if fut is None:
            fut = asyncio.ensure_future(call(fn, *args))  # a database that is down: a 503
            self._inflight[key] = fut
            fut.add_done_callback(self._done(key))
        # shield: one caller going away must not cancel the load the others are waiting for
        return await asyncio.shield(fut)

    def _done(self, key: Hashable) -> Callable[[asyncio.Future[Any]], None]:
        def forget(_f: asyncio.Future[Any]) -> None:
            self._inflight.pop(key, None)

        return forget


class Authenticator:
    """The master key and the virtual keys in ``engine``. ``redis`` (an asyncio client, optional)
    carries key invalidations between replicas."""

    def __init__(self, master_key: str | None, engine: Engine | None, cache_ttl_s: float, denied: Counter,
                 redis: Any = None) -> None:
        self.master_key = master_key
        self.engine = engine
        self.cache_ttl_s = cache_ttl_s
        self.redis = redis
        self.relay: SharedCounters | None = None  # workers of `kaiyuan serve --workers`: the supervisor
        self.loads = SingleFlight()  # shared with the budget seeds (one load per counter, too)
        self._cache: dict[str, tuple[float, Cached | None]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._closing = False
        self.m_denied = denied

    @property
    def open(self) -> bool:
        """No master key: anyone may call the models, nobody the admin API."""
        return self.master_key is None

    # -- callers ---------------------------------------------------------------------------------
    async def authenticate(self, ctx: RequestContext) -> KeyRecord | None:
        """Fill ``ctx.principal`` from the headers; the key's record (limits, budgets) for a virtual
        key, ``None`` for the master key or an open gateway. Raises a 401 otherwise."""
        if self.master_key is None:
            return None
        token = bearer_token(ctx.headers)
        if token is None:
            raise _unauthenticated("missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>'); "
                                   "retrying without a key will not help", "missing_api_key")
        if _matches(token, self.master_key):
            ctx.principal = ADMIN
            return None
        if not keystore.looks_like_key(token) or self.engine is None:
            self.m_denied.labels("invalid_key").inc()
            raise _unauthenticated("invalid API key: this gateway does not accept the key sent (Kaiyuan keys look like "
                                   "'sk-ky-' followed by 43 characters); check the key your client is configured "
                                   "with, or ask your admin for one. Retrying will not help", "invalid_api_key")
        hit = await self._record(token)
        if hit is None:
            self.m_denied.labels("invalid_key").inc()
            raise _unauthenticated("invalid API key: this gateway does not know the key sent (a wrong key, or one "
                                   "replaced by a rotation); check the key your client is configured with. "
                                   "Retrying will not help", "invalid_api_key")
        rec, principal = hit
        if rec.revoked_at is not None:
            self.m_denied.labels("revoked").inc()
            raise _unauthenticated(f"API key {rec.key_id} was revoked at {iso(rec.revoked_at)}", "key_revoked")
        if rec.expires_at is not None and rec.expires_at <= time.time():
            self.m_denied.labels("expired").inc()
            raise _unauthenticated(f"API key {rec.key_id} expired at {iso(rec.expires_at)}", "key_expired")
        ctx.principal = principal  # made once per cached record, shared (read-only) by its requests
        return rec

    # -- the key cache ---------------------------------------------------------------------------
    async def _record(self, token: str) -> Cached | None:
        """The key's record and the principal its requests carry (cached), or None for an unknown key."""
        h = keystore.hash_key(token)
        hit = self._cache.get(h)
        mono = time.monotonic()
        if hit is not None:
            ttl = self.cache_ttl_s if hit[1] is not None else min(NEGATIVE_TTL_S, self.cache_ttl_s)
            if mono - hit[0] < ttl:
                return hit[1]
        assert self.engine is not None
        # Single flight: when a cached key expires under load, one lookup serves every waiting request.
        rec = await self.loads.run(("key", h), keystore.load_key, self.engine, h)
        cached = None if rec is None else (rec, principal_of(rec))
        if len(self._cache) >= KEY_CACHE_MAX:
            self._cache.clear()
        self._cache[h] = (mono, cached)
        return cached

    def invalidate(self, key_hash: str | None = None) -> None:
        """Forget cached keys here (all, or one)."""
        if key_hash is None:
            self._cache.clear()
        else:
            self._cache.pop(key_hash, None)

    async def invalidate_everywhere(self, key_hash: str | None = None) -> None:
        """Forget cached keys here and, with Redis, on every replica at once (the admin API calls this
        after every change); replicas that miss the message still drop the key within the cache TTL."""
        self.invalidate(key_hash)
        if self.relay is not None:
            try:
                await self.relay.publish_invalidation(key_hash)
            except Exception as e:
                log.warning("could not tell the other workers to drop a cached key (%s); they will within %ss",
                            e, self.cache_ttl_s)
        if self.redis is not None:
            try:
                await self.redis.publish(INVALIDATE_CHANNEL, key_hash or "*")
            except Exception as e:
                log.warning("could not tell other replicas to drop a cached key (%s); they will within %ss",
                            e, self.cache_ttl_s)

    def start(self) -> None:
        """Listen for other replicas' invalidations (with Redis) or other workers' (the supervisor's
        relay); call on the running loop."""
        if self._listener is None and self.relay is not None and not self._closing:
            self.relay.on_invalidate = self.invalidate
            self._listener = asyncio.create_task(self.relay.connect(), name="kaiyuan-shared-counters-connect")
        if self._listener is None and self.redis is not None and not self._closing:
            self._listener = asyncio.create_task(self._listen(), name="kaiyuan-key-invalidation")

    async def _listen(self) -> None:
        first = True
        while not self._closing:
            try:
                pubsub = self.redis.pubsub()
                await pubsub.subscribe(INVALIDATE_CHANNEL)
                if not first:
                    self.invalidate()  # anything published while we were not subscribed
                first = False
                async for msg in pubsub.listen():
                    if msg.get("type") != "message":
                        continue
                    data = msg["data"].decode() if isinstance(msg["data"], bytes) else str(msg["data"])
                    self.invalidate(None if data == "*" else data)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("key invalidation channel lost (%s); retrying in 1 s", e)
                first = False
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        self._closing = True
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None


def principal_of(rec: KeyRecord) -> Principal:
    return Principal(key_id=rec.key_id, team_id=rec.team_id, user_id=rec.user_id,
                     allowed_models=rec.allowed_models, policy=rec.policy, key_name=rec.name)


def iso(ts: float | None) -> str:
    if ts is None:
        return "never"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
