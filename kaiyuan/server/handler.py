"""The skeleton every model-calling route shares, whatever the caller's dialect.

:func:`api_handler` builds (once, at import) the aiohttp handler for one route: it opens the
request's context, reads the JSON body, admits it through the guard, validates it, finds the
model, hands over to the dialect's own middle (build the upstream call, execute, answer), and
always ends the same way: errors in the caller's dialect, the upstream reply closed, the in-flight
gauge, the guard settled and the request finished (metrics, log, trials).

The middle stores the upstream reply it gets from ``gw.execute`` in ``ctx.reply`` so the skeleton
closes it. Nothing here allocates per request beyond what the handlers did before (the handler is a
closure made once per route, not per request).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from kaiyuan.context import RequestContext
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.gateway import Gateway
from kaiyuan.server.common import ErrorSerializer, client_gone, error_response, new_request_id, read_json
from kaiyuan.server.deadline import send_whole

GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)

Validator = Callable[[dict[str, Any]], None]
# (request, gateway, ctx, body, the route's own argument) -> the response
Middle = Callable[[web.Request, Gateway, RequestContext, dict[str, Any], Any], Awaitable[web.StreamResponse]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# (request, body) -> None: fills the body from the URL before anything reads it (Gemini: the model)
Prepare = Callable[[web.Request, dict[str, Any]], None]


def api_handler(dialect: str, endpoint: str, serialize: ErrorSerializer, validate: Validator, middle: Middle,
                arg: Any = None, prepare: Prepare | None = None) -> Handler:
    """The route handler for ``endpoint`` in ``dialect``: the shared skeleton around ``middle``.

    ``validate`` checks the body after admission (a 400 in the caller's dialect); ``serialize`` is
    the dialect's error body; ``arg`` is passed to ``middle`` unchanged; ``prepare``, when given, sees
    the body first (for dialects that carry the model in the URL)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        gw = request.app[GATEWAY_KEY]
        ctx = RequestContext(new_request_id(), dialect, endpoint, headers=request.headers)
        gw.metrics.in_flight.inc()
        try:
            srv = gw.config.server
            ctx.raw_body, body = await read_json(request, srv.max_body_bytes, srv.body_timeout_s, srv.max_json_depth)
            if prepare is not None:
                prepare(request, body)
            if isinstance(body.get("model"), str):
                ctx.model = body["model"]
            ctx.body = body  # the guard counts the prompt from it
            await gw.guard.admit(ctx)
            validate(body)
            ctx.model = body["model"]
            gw.model_config(ctx)
            resp = await middle(request, gw, ctx, body, arg)
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
            if ctx.reply is not None:
                await ctx.reply.aclose()
            gw.metrics.in_flight.dec()
            await gw.guard.settle(ctx)
            gw.finish(ctx)
        # A whole body goes out under the reply's deadline (server.deadline), once the request is
        # recorded: a client that does not read it is dropped, it is logged as answered.
        return await send_whole(request, resp, ctx)

    handle.__name__ = handle.__qualname__ = f"{dialect}_{endpoint}"
    return handle


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
