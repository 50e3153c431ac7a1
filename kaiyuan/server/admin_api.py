"""The admin REST API under /admin: teams, users, keys, budgets, spend, prices.

Every route follows one rule (:func:`kaiyuan.console.access.authorize`): the master key, an
admin-scoped key or an admin's console session; a few read routes also serve a team's key or
session, limited to its own team. With no master key configured the admin API is off (403). Input is validated with pydantic; every error is a JSON
``{"error": {...}}`` with a status that means what it says. Each change is one transaction.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kaiyuan.accounting import keystore, reports
from kaiyuan.accounting.keystore import Budget, StoreError
from kaiyuan.console.access import VIEWER, Viewer, authorize
from kaiyuan.dialects import openai as oai
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.gateway import Gateway
from kaiyuan.server.common import JSON_CT, error_response, read_body
from kaiyuan.server.openai_api import GATEWAY_KEY

Period = Literal["day", "week", "month", "total"]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Limits(_In):
    allowed_models: list[str] | None = Field(None, description="None: every model")
    policy: str | None = Field(None, max_length=200, description="data policy name, enforced by routing")
    rpm: int | None = Field(None, gt=0)
    tpm: int | None = Field(None, gt=0)
    max_parallel: int | None = Field(None, gt=0)


class TeamIn(Limits):
    name: str = Field(..., min_length=1, max_length=200)


class TeamPatch(Limits):
    name: str | None = Field(None, min_length=1, max_length=200)


class UserIn(_In):
    name: str = Field(..., min_length=1, max_length=200)
    email: str | None = Field(None, max_length=320)
    team_id: str | None = None


class BudgetSpec(_In):
    period: Period
    limit_usd: float = Field(..., ge=0, description="USD; 0 blocks every paid request")


class KeyIn(Limits):
    name: str = Field(..., min_length=1, max_length=200)
    admin: bool = Field(False, description="admin-scoped: may use the admin API and the console as an admin")
    team_id: str | None = None
    user_id: str | None = None
    expires_at: datetime | float | None = Field(None, description="ISO 8601 or unix seconds")
    expires_in_s: float | None = Field(None, gt=0)
    budgets: list[BudgetSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_expiry(self) -> KeyIn:
        if self.expires_at is not None and self.expires_in_s is not None:
            raise ValueError("give expires_at or expires_in_s, not both")
        periods = [b.period for b in self.budgets]
        if len(set(periods)) != len(periods):
            raise ValueError("one budget per period")
        return self


class KeyPatch(Limits):
    name: str | None = Field(None, min_length=1, max_length=200)
    team_id: str | None = None
    expires_at: datetime | float | None = None
    expires_in_s: float | None = Field(None, gt=0)


class BudgetIn(_In):
    scope: Literal["key", "team"]
    scope_id: str = Field(..., min_length=1)
    period: Period
    limit_usd: float = Field(..., ge=0, description="USD; must not be negative")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS), status=status, content_type=JSON_CT)


def _err(status: int, message: str, code: str, param: str | None = None) -> GatewayError:
    kind = {400: ErrorKind.INVALID_REQUEST, 401: ErrorKind.AUTHENTICATION, 403: ErrorKind.PERMISSION,
            404: ErrorKind.NOT_FOUND, 409: ErrorKind.INVALID_REQUEST}.get(status, ErrorKind.INVALID_REQUEST)
    return GatewayError(kind, message, status=status, code=code, param=param)


def admin(handler: Handler, *, team_ok: bool = False) -> Handler:
    """The one admin rule (kaiyuan.console.access.authorize); input/store errors -> JSON errors."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            await authorize(request, team_ok=team_ok)
            return await handler(request)
        except GatewayError as e:
            return error_response(e, oai.error_body)
        except StoreError as e:
            return error_response(_err(e.status, e.message, e.code), oai.error_body)
        except ValidationError as e:
            parts = [f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()]
            return error_response(_err(400, "invalid input: " + "; ".join(parts), "invalid_input"), oai.error_body)

    return wrapped


def team_readable(handler: Handler) -> Handler:
    """An admin route that a team's key or console session may also read (its own team's rows only)."""
    return admin(handler, team_ok=True)


async def _body(request: web.Request, model: type[_In]) -> Any:
    try:
        data = orjson.loads(await read_body(request) or b"{}")
    except orjson.JSONDecodeError as e:
        raise _err(400, f"the request body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(data, dict):
        raise _err(400, "the request body must be a JSON object", "invalid_json")
    return model.model_validate(data)


async def _invalidate(gw: Gateway, key_hash: str | None = None) -> None:
    """After an admin change: drop cached keys here and, with Redis, on every replica."""
    await gw.auth.invalidate_everywhere(key_hash)


def _check_models(gw: Gateway, models: list[str] | None) -> None:
    if models is None:
        return
    unknown = sorted(set(models) - set(gw.models))
    if unknown:
        raise _err(
            400,
            f"unknown model(s) in allowed_models: {', '.join(unknown)}; this gateway has: {', '.join(sorted(gw.models)) or '(none)'}",
            "unknown_model",
            "allowed_models",
        )


def _check_policy(policy: str | None) -> None:
    """A data policy must parse (when the routing module that enforces policies is installed)."""
    if policy is None:
        return
    try:
        from kaiyuan.routing.policy import parse_policy  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return
    try:
        parse_policy(policy)
    except ValueError as e:
        raise _err(400, f"policy: {e}", "invalid_policy", "policy") from None


def _expiry(v: datetime | float | None, in_s: float | None) -> float | None:
    if in_s is not None:
        return time.time() + in_s
    if isinstance(v, datetime):
        return v.timestamp()
    return v


def _fields(m: BaseModel) -> dict[str, Any]:
    return m.model_dump(exclude_unset=True, exclude={"budgets", "expires_in_s"})


async def _run(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


# -- teams -----------------------------------------------------------------------------------------
@admin
async def create_team(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    body = await _body(request, TeamIn)
    _check_models(gw, body.allowed_models)
    _check_policy(body.policy)
    return _json(await _run(keystore.create_team, gw.engine, _fields(body)), 201)


@admin
async def list_teams(request: web.Request) -> web.StreamResponse:
    return _json({"object": "list", "data": await _run(keystore.list_teams, request.app[GATEWAY_KEY].engine)})


@admin
async def get_team(request: web.Request) -> web.StreamResponse:
    return _json(await _run(keystore.get_team, request.app[GATEWAY_KEY].engine, request.match_info["id"]))


@admin
async def patch_team(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    body = await _body(request, TeamPatch)
    _check_models(gw, body.allowed_models)
    _check_policy(body.policy)
    out = await _run(keystore.update_team, gw.engine, request.match_info["id"], _fields(body))
    await _invalidate(gw)
    return _json(out)


@admin
async def delete_team(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    await _run(keystore.delete_team, gw.engine, request.match_info["id"])
    await _invalidate(gw)
    return _json({"id": request.match_info["id"], "deleted": True})


# -- users -----------------------------------------------------------------------------------------
@admin
async def create_user(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    body = await _body(request, UserIn)
    return _json(await _run(keystore.create_user, gw.engine, _fields(body)), 201)


@admin
async def list_users(request: web.Request) -> web.StreamResponse:
    return _json({"object": "list", "data": await _run(keystore.list_users, request.app[GATEWAY_KEY].engine)})


# -- keys ------------------------------------------------------------------------------------------
@admin
async def create_key(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    body = await _body(request, KeyIn)
    _check_models(gw, body.allowed_models)
    _check_policy(body.policy)
    data = _fields(body)
    data["expires_at"] = _expiry(body.expires_at, body.expires_in_s)
    out = await _run(keystore.create_key, gw.engine, data, [b.model_dump() for b in body.budgets])
    out["note"] = "store this key now: it is shown only once"
    return _json(out, 201)


@team_readable
async def list_keys(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    viewer: Viewer = request[VIEWER]
    if viewer.is_admin:
        data = await _run(keystore.list_keys, gw.engine, request.query.get("team_id"))
    elif viewer.team_id is not None:
        data = await _run(keystore.list_keys, gw.engine, viewer.team_id)
    else:
        data = [k for k in await _run(keystore.list_keys, gw.engine, None) if k["id"] == viewer.key_id]
    return _json({"object": "list", "data": data})


@admin
async def get_key(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    out = await _run(keystore.get_key, gw.engine, request.match_info["id"])
    for b in out["budgets"]:
        b.update(await gw.reservations.budget_status(Budget(b["id"], b["scope"], b["scope_id"], b["period"], b["limit_usd"])))
    return _json(out)


@admin
async def patch_key(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    body = await _body(request, KeyPatch)
    _check_models(gw, body.allowed_models)
    _check_policy(body.policy)
    data = _fields(body)
    if "expires_at" in data or body.expires_in_s is not None:
        data["expires_at"] = _expiry(body.expires_at, body.expires_in_s)
    out, old_hash = await _run(keystore.update_key, gw.engine, request.match_info["id"], data)
    await _invalidate(gw, old_hash)
    return _json(out)


@admin
async def revoke_key(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    out, old_hash = await _run(keystore.revoke_key, gw.engine, request.match_info["id"])
    await _invalidate(gw, old_hash)
    return _json(out)


@admin
async def rotate_key(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    out, old_hash = await _run(keystore.rotate_key, gw.engine, request.match_info["id"])
    await _invalidate(gw, old_hash)
    out["note"] = "the old secret no longer works; store this key now: it is shown only once"
    return _json(out)


# -- budgets ---------------------------------------------------------------------------------------
@admin
async def put_budget(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    body = await _body(request, BudgetIn)
    out = await _run(keystore.set_budget, gw.engine, body.scope, body.scope_id, body.period, body.limit_usd)
    await _invalidate_scope(gw, body.scope, body.scope_id)
    return _json(out, 201)


@admin
async def list_budgets(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    data = await _run(keystore.list_budgets, gw.engine)
    for b in data:
        b.update(await gw.reservations.budget_status(Budget(b["id"], b["scope"], b["scope_id"], b["period"], b["limit_usd"])))
    return _json({"object": "list", "data": data})


@admin
async def delete_budget(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    row = await _run(keystore.delete_budget, gw.engine, request.match_info["id"])
    await _invalidate_scope(gw, row["scope"], row["scope_id"])
    return _json({"id": row["id"], "deleted": True})


async def _invalidate_scope(gw: Gateway, scope: str, scope_id: str) -> None:
    for h in await _run(keystore.hashes_for_scope, gw.engine, scope, scope_id):
        await gw.auth.invalidate_everywhere(h)


# -- spend and prices ------------------------------------------------------------------------------
@admin
async def spend(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    await gw.ledger.flush()
    q = request.query
    try:
        params = reports.SpendQuery.from_query(dict(q))
    except ValueError as e:
        raise _err(400, str(e), "invalid_query") from None
    ref = None
    if params.reference:
        ref = reports.reference_price(params.reference, gw.config, gw.costing.catalog)
        if ref is None:
            raise _err(400, f"reference model {params.reference!r} has no known price", "unknown_reference", "reference")
    result = await _run(reports.spend_report, gw.engine, params, ref)
    if q.get("format") == "csv":
        return web.Response(
            body=reports.to_csv(result).encode(),
            content_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="kaiyuan-spend.csv"'},
        )
    return _json(result)


@admin
async def prices(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    data = []
    for did, pd in gw.costing.deployments.items():
        price = pd.price
        data.append({
            "deployment": did,
            "upstream_model": pd.deployment.model,
            "vendor": pd.vendor,
            "source": price.source if price else None,
            "input_usd_per_m": round(price.base.input * 1e6, 6) if price else None,
            "output_usd_per_m": round(price.base.output * 1e6, 6) if price else None,
            "price_known": price is not None,
        })
    return _json({"object": "list", "catalog_version": gw.costing.catalog.version, "data": data})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/admin/teams", create_team)
    r.add_get("/admin/teams", list_teams)
    r.add_get("/admin/teams/{id}", get_team)
    r.add_patch("/admin/teams/{id}", patch_team)
    r.add_delete("/admin/teams/{id}", delete_team)
    r.add_post("/admin/users", create_user)
    r.add_get("/admin/users", list_users)
    r.add_post("/admin/keys", create_key)
    r.add_get("/admin/keys", list_keys)
    r.add_get("/admin/keys/{id}", get_key)
    r.add_patch("/admin/keys/{id}", patch_key)
    r.add_post("/admin/keys/{id}/revoke", revoke_key)
    r.add_post("/admin/keys/{id}/rotate", rotate_key)
    r.add_post("/admin/budgets", put_budget)
    r.add_get("/admin/budgets", list_budgets)
    r.add_delete("/admin/budgets/{id}", delete_budget)
    r.add_get("/admin/spend", spend)
    r.add_get("/admin/prices", prices)
