"""Durable keys, teams, users and budgets (SQLAlchemy Core, sync: call it via ``asyncio.to_thread``).

A virtual key is ``sk-ky-`` + 32 random bytes (base64url). Only its sha256 is stored; the secret
is returned once, by create and rotate. Every function here runs in one transaction: it either
writes everything or nothing.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Engine, and_, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from kaiyuan.limits.counters import RateCheck
from kaiyuan.store.fast_insert import insert_tuples
from kaiyuan.store.schema import api_keys, budgets, spend_ledger, teams, users

KEY_PREFIX = "sk-ky-"
PERIODS = ("day", "week", "month", "total")


class StoreError(Exception):
    """A request the store refuses; ``status`` is the HTTP status the admin API answers with."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def new_id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(9).hex()}"


def new_secret() -> str:
    return KEY_PREFIX + base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def looks_like_key(token: str) -> bool:
    return token.startswith(KEY_PREFIX) and len(token) == len(KEY_PREFIX) + 43


def hint(secret: str) -> str:
    return f"{secret[:10]}…{secret[-4:]}"


# -- periods -------------------------------------------------------------------------------------
_BOUNDS: dict[str, tuple[float, float]] = {}  # the last bounds worked out per period (at most 3)


def period_bounds(period: str, now: float) -> tuple[float, float | None]:
    """[start, reset) of the UTC calendar period containing ``now``; ``total`` never resets.
    Every budgeted request asks, so the current period's bounds are kept until ``now`` leaves them."""
    if period == "total":
        return 0.0, None
    hit = _BOUNDS.get(period)
    if hit is not None and hit[0] <= now < hit[1]:
        return hit
    bounds = _calendar_bounds(period, now)
    _BOUNDS[period] = bounds
    return bounds


def _calendar_bounds(period: str, now: float) -> tuple[float, float]:
    d = datetime.fromtimestamp(now, UTC)
    day = datetime(d.year, d.month, d.day, tzinfo=UTC)
    if period == "day":
        start, end = day, day + timedelta(days=1)
    elif period == "week":
        start = day - timedelta(days=d.weekday())
        end = start + timedelta(days=7)
    elif period == "month":
        start = datetime(d.year, d.month, 1, tzinfo=UTC)
        end = start + timedelta(days=calendar.monthrange(d.year, d.month)[1])
    else:
        raise ValueError(f"unknown period {period!r}")
    return start.timestamp(), end.timestamp()


# -- what the guard needs about a key ----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Budget:
    id: str
    scope: str  # key | team
    scope_id: str
    period: str
    limit_usd: float


@dataclass(slots=True)
class KeyRecord:
    key_id: str
    name: str
    team_id: str | None
    user_id: str | None
    allowed_models: frozenset[str] | None
    policy: str | None
    limits: dict[str, dict[str, int]]  # scope ("key:ID" / "team:ID") -> {"rpm":..,"tpm":..,"max_parallel":..}
    budgets: list[Budget]
    expires_at: float | None
    revoked_at: float | None
    loaded_at: float = field(default_factory=time.monotonic)
    # the limits as the counters check them, built once per load (every request of the key shares them)
    rates: list[RateCheck] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.rates = [RateCheck(scope, lim.get("rpm"), lim.get("tpm"), lim.get("max_parallel"))
                      for scope, lim in self.limits.items()]


def _models(text: str | None) -> list[str] | None:
    return None if text is None else list(orjson.loads(text))


def _limits(row: Any) -> dict[str, int]:
    return {k: row[k] for k in ("rpm", "tpm", "max_parallel") if row[k] is not None}


def load_key(engine: Engine, key_hash: str) -> KeyRecord | None:
    """The key with this hash, merged with its team (allowed models intersect; key policy wins)."""
    with engine.connect() as conn:
        k = conn.execute(select(api_keys).where(api_keys.c.key_hash == key_hash)).mappings().first()
        if k is None:
            return None
        t = None
        if k["team_id"]:
            t = conn.execute(select(teams).where(teams.c.id == k["team_id"])).mappings().first()
        scopes = [("key", k["id"])] + ([("team", k["team_id"])] if k["team_id"] else [])
        conds = [and_(budgets.c.scope == s, budgets.c.scope_id == i) for s, i in scopes]
        from sqlalchemy import or_

        brows = conn.execute(select(budgets).where(or_(*conds))).mappings().all()
    allowed: frozenset[str] | None = None
    for src in (k, t):
        if src is not None and src["allowed_models"] is not None:
            ms = frozenset(_models(src["allowed_models"]) or [])
            allowed = ms if allowed is None else allowed & ms
    limits = {f"key:{k['id']}": _limits(k)}
    if t is not None:
        limits[f"team:{t['id']}"] = _limits(t)
    return KeyRecord(
        key_id=k["id"],
        name=k["name"],
        team_id=k["team_id"],
        user_id=k["user_id"],
        allowed_models=allowed,
        policy=k["policy"] or (t["policy"] if t is not None else None),
        limits={s: v for s, v in limits.items() if v},
        budgets=[Budget(b["id"], b["scope"], b["scope_id"], b["period"], float(b["limit_usd"])) for b in brows],
        expires_at=k["expires_at"],
        revoked_at=k["revoked_at"],
    )


def spent_since(engine: Engine, scope: str, scope_id: str, since: float) -> float:
    col = spend_ledger.c.key_id if scope == "key" else spend_ledger.c.team_id
    with engine.connect() as conn:
        v = conn.execute(
            select(func.coalesce(func.sum(spend_ledger.c.cost_usd), 0.0)).where(col == scope_id, spend_ledger.c.ts >= since)
        ).scalar_one()
    return float(v)


def write_spend(engine: Engine, cols: tuple[str, ...], rows: Sequence[tuple[Any, ...]]) -> None:
    """Append spend rows, each a tuple of ``cols`` (``SpendLedger``'s ``SpendRow``)."""
    with engine.begin() as conn:
        insert_tuples(conn, spend_ledger, cols, rows)


# -- admin operations --------------------------------------------------------------------------
def _dump_models(v: list[str] | None) -> str | None:
    return None if v is None else orjson.dumps(sorted(set(v))).decode()


def _public(row: Any, table: str) -> dict[str, Any]:
    d = dict(row)
    if "allowed_models" in d:
        d["allowed_models"] = _models(d["allowed_models"])
    d.pop("key_hash", None)
    d["object"] = table
    return d


def _not_found(what: str, id_: str) -> StoreError:
    return StoreError(404, f"{what} {id_!r} does not exist", f"{what}_not_found")


def create_team(engine: Engine, data: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    row = {"id": new_id("team"), **data, "allowed_models": _dump_models(data.get("allowed_models")), "created_at": now, "updated_at": now}
    try:
        with engine.begin() as conn:
            conn.execute(insert(teams), [row])
    except IntegrityError:
        raise StoreError(409, f"a team named {data['name']!r} already exists", "team_exists") from None
    return get_team(engine, row["id"])


def get_team(engine: Engine, team_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        r = conn.execute(select(teams).where(teams.c.id == team_id)).mappings().first()
    if r is None:
        raise _not_found("team", team_id)
    return _public(r, "team")


def list_teams(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [_public(r, "team") for r in conn.execute(select(teams).order_by(teams.c.created_at)).mappings()]


def update_team(engine: Engine, team_id: str, data: dict[str, Any]) -> dict[str, Any]:
    if "allowed_models" in data:
        data["allowed_models"] = _dump_models(data["allowed_models"])
    with engine.begin() as conn:
        n = conn.execute(update(teams).where(teams.c.id == team_id).values(**data, updated_at=time.time())).rowcount
    if not n:
        raise _not_found("team", team_id)
    return get_team(engine, team_id)


def delete_team(engine: Engine, team_id: str) -> None:
    with engine.begin() as conn:
        live = conn.execute(
            select(func.count()).select_from(api_keys).where(api_keys.c.team_id == team_id, api_keys.c.revoked_at.is_(None))
        ).scalar_one()
        if live:
            raise StoreError(409, f"team {team_id!r} still has {live} active key(s); revoke them first", "team_has_keys")
        n = conn.execute(delete(teams).where(teams.c.id == team_id)).rowcount
        if not n:
            raise _not_found("team", team_id)
        conn.execute(delete(budgets).where(budgets.c.scope == "team", budgets.c.scope_id == team_id))


def _check_team(conn: Any, team_id: str | None) -> None:
    if team_id is not None and conn.execute(select(teams.c.id).where(teams.c.id == team_id)).first() is None:
        raise StoreError(400, f"team {team_id!r} does not exist", "team_not_found")


def create_user(engine: Engine, data: dict[str, Any]) -> dict[str, Any]:
    row = {"id": new_id("user"), **data, "created_at": time.time()}
    try:
        with engine.begin() as conn:
            _check_team(conn, data.get("team_id"))
            conn.execute(insert(users), [row])
    except IntegrityError:
        raise StoreError(409, f"a user with email {data.get('email')!r} already exists", "user_exists") from None
    return _public(row, "user")


def list_users(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [_public(r, "user") for r in conn.execute(select(users).order_by(users.c.created_at)).mappings()]


def create_key(engine: Engine, data: dict[str, Any], key_budgets: list[dict[str, Any]]) -> dict[str, Any]:
    """A new key (and its budgets, in the same transaction). The result holds the secret, once."""
    now = time.time()
    secret = new_secret()
    row = {
        "id": new_id("key"),
        **data,
        "allowed_models": _dump_models(data.get("allowed_models")),
        "key_hash": hash_key(secret),
        "key_hint": hint(secret),
        "created_at": now,
        "updated_at": now,
        "version": 1,
    }
    with engine.begin() as conn:
        _check_team(conn, data.get("team_id"))
        if data.get("user_id") and conn.execute(select(users.c.id).where(users.c.id == data["user_id"])).first() is None:
            raise StoreError(400, f"user {data['user_id']!r} does not exist", "user_not_found")
        conn.execute(insert(api_keys), [row])
        for b in key_budgets:
            _put_budget(conn, "key", row["id"], b["period"], b["limit_usd"])
    out = get_key(engine, row["id"])
    out["key"] = secret
    return out


def get_key(engine: Engine, key_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        r = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).mappings().first()
        if r is None:
            raise _not_found("key", key_id)
        bs = conn.execute(select(budgets).where(budgets.c.scope == "key", budgets.c.scope_id == key_id)).mappings().all()
    out = _public(r, "key")
    out["budgets"] = [dict(b) for b in bs]
    out["status"] = key_status(r, time.time())
    return out


def key_status(row: Any, now: float) -> str:
    if row["revoked_at"] is not None:
        return "revoked"
    if row["expires_at"] is not None and row["expires_at"] <= now:
        return "expired"
    return "active"


def list_keys(engine: Engine, team_id: str | None = None) -> list[dict[str, Any]]:
    q = select(api_keys).order_by(api_keys.c.created_at)
    if team_id:
        q = q.where(api_keys.c.team_id == team_id)
    now = time.time()
    with engine.connect() as conn:
        return [{**_public(r, "key"), "status": key_status(r, now)} for r in conn.execute(q).mappings()]


def update_key(engine: Engine, key_id: str, data: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Change a key; returns it and its old hash (so caches can drop it)."""
    if "allowed_models" in data:
        data["allowed_models"] = _dump_models(data["allowed_models"])
    with engine.begin() as conn:
        old = conn.execute(select(api_keys.c.key_hash).where(api_keys.c.id == key_id)).first()
        if old is None:
            raise _not_found("key", key_id)
        if "team_id" in data:
            _check_team(conn, data["team_id"])
        conn.execute(
            update(api_keys).where(api_keys.c.id == key_id).values(**data, updated_at=time.time(), version=api_keys.c.version + 1)
        )
    return get_key(engine, key_id), old[0]


def revoke_key(engine: Engine, key_id: str) -> tuple[dict[str, Any], str]:
    with engine.begin() as conn:
        old = conn.execute(select(api_keys.c.key_hash, api_keys.c.revoked_at).where(api_keys.c.id == key_id)).first()
        if old is None:
            raise _not_found("key", key_id)
        if old[1] is None:
            now = time.time()
            conn.execute(
                update(api_keys).where(api_keys.c.id == key_id).values(revoked_at=now, updated_at=now, version=api_keys.c.version + 1)
            )
    return get_key(engine, key_id), old[0]


def rotate_key(engine: Engine, key_id: str) -> tuple[dict[str, Any], str]:
    """A new secret for the same key (same id, limits, budgets, spend). Compare-and-set on ``version``:
    of two concurrent rotations exactly one wins; the other gets 409 and changes nothing."""
    with engine.connect() as conn:
        cur = conn.execute(
            select(api_keys.c.key_hash, api_keys.c.version, api_keys.c.revoked_at).where(api_keys.c.id == key_id)
        ).first()
    if cur is None:
        raise _not_found("key", key_id)
    if cur[2] is not None:
        raise StoreError(409, f"key {key_id!r} is revoked; create a new key instead", "key_revoked")
    secret = new_secret()
    now = time.time()
    with engine.begin() as conn:
        n = conn.execute(
            update(api_keys)
            .where(api_keys.c.id == key_id, api_keys.c.version == cur[1])
            .values(key_hash=hash_key(secret), key_hint=hint(secret), rotated_at=now, updated_at=now, version=cur[1] + 1)
        ).rowcount
    if n != 1:
        raise StoreError(409, f"key {key_id!r} was changed concurrently (rotated or updated); nothing was changed, retry", "key_conflict")
    out = get_key(engine, key_id)
    out["key"] = secret
    return out, cur[0]


def _put_budget(conn: Any, scope: str, scope_id: str, period: str, limit_usd: float) -> str:
    existing = conn.execute(
        select(budgets.c.id).where(budgets.c.scope == scope, budgets.c.scope_id == scope_id, budgets.c.period == period)
    ).first()
    if existing is not None:
        conn.execute(update(budgets).where(budgets.c.id == existing[0]).values(limit_usd=limit_usd))
        return str(existing[0])
    bid = new_id("bud")
    conn.execute(
        insert(budgets),
        [{"id": bid, "scope": scope, "scope_id": scope_id, "period": period, "limit_usd": limit_usd, "created_at": time.time()}],
    )
    return bid


def set_budget(engine: Engine, scope: str, scope_id: str, period: str, limit_usd: float) -> dict[str, Any]:
    table = api_keys if scope == "key" else teams
    with engine.begin() as conn:
        if conn.execute(select(table.c.id).where(table.c.id == scope_id)).first() is None:
            raise StoreError(400, f"{scope} {scope_id!r} does not exist", f"{scope}_not_found")
        bid = _put_budget(conn, scope, scope_id, period, limit_usd)
        r = conn.execute(select(budgets).where(budgets.c.id == bid)).mappings().one()
    return {**dict(r), "object": "budget"}


def list_budgets(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [{**dict(r), "object": "budget"} for r in conn.execute(select(budgets).order_by(budgets.c.created_at)).mappings()]


def delete_budget(engine: Engine, budget_id: str) -> dict[str, Any]:
    with engine.begin() as conn:
        r = conn.execute(select(budgets).where(budgets.c.id == budget_id)).mappings().first()
        if r is None:
            raise _not_found("budget", budget_id)
        conn.execute(delete(budgets).where(budgets.c.id == budget_id))
    return dict(r)


def hashes_for_scope(engine: Engine, scope: str, scope_id: str) -> list[str]:
    col = api_keys.c.id if scope == "key" else api_keys.c.team_id
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(select(api_keys.c.key_hash).where(col == scope_id))]
