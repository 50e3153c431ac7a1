"""The request path, written once: every model-calling route of every API family runs it.

A request's life, top to bottom (:func:`api_handler`'s ``handle``):

1. authenticate: from the headers only, before a byte of the body is read;
2. read and parse the body, and validate it in the caller's dialect;
3. resolve the model: the pre-route hooks (trials: canary split, promotion) may change it;
4. authorize: the key may use the model it asked for and the one that will serve it, and some
   deployment it can reach satisfies its data policy (one dict lookup, precomputed per policy);
   then a route's ``load`` step reads the state the request continues (Responses: ``previous_response_id``);
5. reserve: limits and budget (virtual keys with limits or budgets only);
6. execute and 7. respond: the dialect's own middle builds the upstream call, runs it through the
   one attempt loop (``gw.execute``, :mod:`kaiyuan.routing.executor`) and writes the answer.
   A whole body that the client's socket takes at once goes out here, before 8 and 9, so the
   caller does not wait for the bookkeeping (:func:`kaiyuan.server.deadline.send_unblocked`);
8. settle: close the upstream reply, then price the usage, release the reservation, queue the
   ledger row;
9. finish: metrics, request log, completion hooks (trials, tracing);
10. any other whole (non-streamed) body is sent last, under the reply's deadline
    (:mod:`kaiyuan.server.deadline`).

Whatever happens in 2-7 (an answer, an error, a bug, the client hanging up), 8 and 9 run, and an
error reaches the caller in its own dialect. Nothing here allocates per request beyond the context.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from kaiyuan.accounting.costing import BILLED_ENDPOINTS
from kaiyuan.accounting.usage_check import clamp_to_plausible
from kaiyuan.config import ModelConfig
from kaiyuan.context import RequestContext
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.gateway import Gateway
from kaiyuan.observability.request_log import shown
from kaiyuan.offload import big
from kaiyuan.routing.executor import close_upstream
from kaiyuan.server.common import ErrorSerializer, client_gone, error_response, new_request_id, read_json
from kaiyuan.server.deadline import send_unblocked, send_whole

GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)

Validator = Callable[[dict[str, Any]], None]
# (request, gateway, ctx, body, the route's own argument) -> the response
Middle = Callable[[web.Request, Gateway, RequestContext, dict[str, Any], Any], Awaitable[web.StreamResponse]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# (request, body) -> None: fills the body from the URL before anything reads it (Gemini: the model)
Prepare = Callable[[web.Request, dict[str, Any]], None]
# (request, gateway, ctx, body) -> None: reads the server-side state the request continues into ctx
# (Responses: the previous_response_id conversation), so the reservation counts it in the prompt
Load = Callable[[web.Request, Gateway, RequestContext, dict[str, Any]], Awaitable[None]]


def api_handler(dialect: str, endpoint: str, serialize: ErrorSerializer, validate: Validator, middle: Middle,
                arg: Any = None, prepare: Prepare | None = None, load: Load | None = None) -> Handler:
    """The route handler for ``endpoint`` in ``dialect``: the request's life around ``middle``.

    ``validate`` checks the body (a 400 in the caller's dialect); ``serialize`` is the dialect's
    error body; ``arg`` is passed to ``middle`` unchanged; ``prepare``, when given, sees the body
    first (for dialects that carry the model in the URL); ``load``, when given, runs after
    authorization and before the reservation. The handler is made once per route."""

    async def handle(request: web.Request) -> web.StreamResponse:
        gw = request.app[GATEWAY_KEY]
        ctx = RequestContext(new_request_id(), dialect, endpoint, headers=request.headers)
        gw.metrics.in_flight_add(1)
        try:
            key = await gw.auth.authenticate(ctx)
            if key is None:  # no virtual key names the caller: its address does (per-caller breakers)
                ctx.client = request.remote
            body = await read_body(request, gw, ctx, validate, prepare)
            model = resolve_model(gw, ctx)
            authorize(gw, ctx, model)
            if load is not None:
                await load(request, gw, ctx, body)
            if ctx.endpoint in BILLED_ENDPOINTS:
                gw.ledger.check()  # fail closed while spend cannot be recorded (queue full, database down)
            if key is not None and (pending := gw.reservations.reserve_now(ctx, key)) is not None:
                await pending  # (decided in process: no coroutine to make and await)
            resp = await middle(request, gw, ctx, body, arg)
            await send_unblocked(request, resp)
        except GatewayError as e:
            ctx.status, ctx.error = e.status, e.message
            return error_response(e, serialize, ctx)
        except (asyncio.CancelledError, ConnectionResetError):
            client_gone(ctx)
            raise
        except Exception as e:  # a bug must still answer in the caller's dialect, never a stack trace
            request.app.logger.exception("internal error on %s", ctx.request_id)
            err = GatewayError(ErrorKind.INTERNAL, f"internal gateway error ({type(e).__name__}); request id {ctx.request_id}")
            ctx.status, ctx.error = 500, err.message
            return error_response(err, serialize, ctx)
        finally:
            await end(gw, ctx)
        # 10. a whole body goes out under the reply's deadline (server.deadline), once the request is
        # recorded: a client that does not read it is dropped, and it is logged as answered.
        return await send_whole(request, resp, ctx)

    handle.__name__ = handle.__qualname__ = f"{dialect}_{endpoint}"
    return handle


async def read_body(request: web.Request, gw: Gateway, ctx: RequestContext, validate: Validator,
                    prepare: Prepare | None = None) -> dict[str, Any]:
    """Read the JSON body (within ``server.max_body_bytes``, ``body_timeout_s`` and ``max_json_depth``)
    and validate it in the caller's dialect."""
    srv = gw.config.server
    ctx.raw_body, body = await read_json(request, srv.max_body_bytes, srv.body_timeout_s, srv.max_json_depth)
    if prepare is not None:
        prepare(request, body)
    ctx.body = body
    if isinstance(body.get("model"), str):
        ctx.model = body["model"]  # for the log, should validation refuse the body
    if big(len(ctx.raw_body)):  # pure Python over every message: a large body is checked off the loop
        await asyncio.to_thread(validate, body)
    else:
        validate(body)
    ctx.model = ctx.requested_model = body["model"]
    return body


def resolve_model(gw: Gateway, ctx: RequestContext) -> ModelConfig:
    """The model that will serve the request: the pre-route hooks (trials) may rewrite ``ctx.model``
    (a canary arm, a promoted candidate) or flag the request (shadow sampling); an unknown name is a 404."""
    for hook in gw.pre_route:
        hook(ctx)
    m = gw.models.get(ctx.model or "")
    if m is None:
        names = ", ".join(sorted(gw.models)) or "(none configured)"
        raise GatewayError(ErrorKind.NOT_FOUND, f"model {shown(ctx.model)!r} does not exist on this gateway; available "
                                                f"models: {names}", param="model", code="model_not_found")
    ctx.log_bodies = m.log_bodies
    ctx.pricer = gw.costing.cost
    return m


def authorize(gw: Gateway, ctx: RequestContext, m: ModelConfig) -> None:
    """The key may use the model it asked for and the one that serves it, and the data policy (the
    key's and the request header's) is one that some deployment of that model or of a fallback the
    key may use satisfies: else a 403 before anything is reserved. The executor still filters each
    attempt's deployments by the policy (and refuses with a 503 when the allowed ones are unusable)."""
    p = ctx.principal
    for name in (ctx.requested_model or m.name, m.name):
        if not p.may_use(name):
            gw.metrics.denied.labels("model_not_allowed").inc()
            allowed = ", ".join(sorted(p.allowed_models or ())) or "(none)"
            raise GatewayError(ErrorKind.PERMISSION, f"this key may not use model {name!r}; allowed: {allowed}",
                               param="model", code="model_not_allowed")
    policy = gw.router.request_policy(ctx)  # None without a key or header policy (a 400/403 if malformed)
    if policy is not None and not any(p.may_use(n) for n in gw.router.satisfiable(m.name, policy)):
        gw.metrics.denied.labels("policy_unsatisfied").inc()
        gw.router.metrics.refusals.labels(m.name, "policy").inc()
        raise GatewayError(ErrorKind.PERMISSION, f"no deployment of model {m.name!r} or of a fallback this key may use "
                                                 f"is allowed by data policy {ctx.policy!r}; the request was not sent "
                                                 f"anywhere. Ask for a model with such a deployment, or an administrator "
                                                 f"for a different policy", code="policy_unsatisfied")


async def end(gw: Gateway, ctx: RequestContext) -> None:
    """Steps 8 and 9, all of them even when the handler is cancelled during one (a client that
    hangs up as its stream ends): a cancellation is held until the ledger row and the log row are
    queued and the reservation released, then raised again. Without this, an await here was a
    point where a cancelled request lost its ledger row and kept its reservation."""
    cancelled = False
    try:
        await close_upstream(ctx)  # the one place the upstream reply is closed
    except asyncio.CancelledError:
        cancelled = True
    try:
        await settle(gw, ctx)
    except asyncio.CancelledError:
        cancelled = True
    gw.finish(ctx)
    gw.metrics.in_flight_add(-1)  # last: a request is in flight until it is recorded (the answer may be out)
    if cancelled:
        raise asyncio.CancelledError


async def settle(gw: Gateway, ctx: RequestContext) -> None:
    """After the answer, whatever happened (and the upstream reply closed): price the request,
    release its reservation and queue its ledger row. Reported usage is clamped to what the request
    could have used first (:mod:`kaiyuan.accounting.usage_check`)."""
    body = ctx.raw_body + ctx.carried_bytes if ctx.carried_bytes else ctx.raw_body  # + a continued conversation
    clamp_to_plausible(ctx.usage, ctx.request_id, body, ctx.upstream_bytes, ctx.output_cap, ctx.choices,
                       lambda: gw.costing.prompt_count(ctx))
    cost = gw.costing.cost(ctx)
    if cost is None:
        cost = ctx.cost_usd  # the catalog has no price, but a hook (a plugin price source) priced it
    ctx.cost_usd = cost
    if cost is not None:
        gw.record_spend(ctx, cost)  # queued before the release, which may await (Redis)
    if ctx.ticket is not None and (pending := gw.reservations.release_now(ctx, cost)) is not None:
        await pending  # (no reservation, or released in process / queued for Redis: nothing to await)


MAX_LOGGED_PATH = 200  # characters of an unknown path kept in the request log


def record_unknown_route(request: web.Request, status: int) -> None:
    """A request to a route that does not exist: a small request-log row (endpoint "unknown", the
    method and path, truncated, in its error) and a count in ``kaiyuan_unknown_route_requests``, so a
    client pointed at a path the gateway lacks shows in ``kaiyuan logs`` and on the dashboard."""
    gw = request.app.get(GATEWAY_KEY)
    if gw is None:
        return
    gw.metrics.unknown_route(request.method, status)
    ctx = RequestContext(new_request_id(), "http", "unknown")
    ctx.status = status
    path = request.path if len(request.path) <= MAX_LOGGED_PATH else request.path[:MAX_LOGGED_PATH] + "..."
    ctx.error = f"unknown route: {request.method[:16]} {path}" + (" (method not allowed)" if status == 405 else "")
    gw.request_log.submit(ctx)
