"""The Responses API's state on the gateway: the response store and the reasoning seal, made once
per app, and the read/delete routes over stored responses (``GET`` / ``DELETE /v1/responses/{id}``,
``GET /v1/responses/{id}/input_items``), each scoped to the key that made the response.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from aiohttp import web

from kaiyuan.context import RequestContext
from kaiyuan.dialects import canonical as c
from kaiyuan.dialects import openai as oai
from kaiyuan.dialects import responses as rq
from kaiyuan.dialects import responses_out as ro
from kaiyuan.dialects.responses_stream import ChatToResponses
from kaiyuan.errors import ErrorKind, GatewayError, invalid
from kaiyuan.gateway import Gateway
from kaiyuan.pipeline import GATEWAY_KEY
from kaiyuan.sealing import Sealer, derive_key, stored_secret
from kaiyuan.server.common import JSON_CT, error_response, new_request_id
from kaiyuan.store.responses import ResponseStore

log = logging.getLogger("kaiyuan.responses")
MAX_NOTED = 1024  # distinct (model, tools) pairs logged at INFO; later repeats go to DEBUG


class ResponsesRuntime:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.store = ResponseStore(gw.engine, gw.config.responses)
        self._sealer: Sealer | None = None
        self._noted: set[tuple[str, str]] = set()

    async def start(self) -> None:
        cfg = self.gw.config
        secret = cfg.responses.seal_secret or cfg.server.master_key
        if secret is None:
            secret = await asyncio.to_thread(stored_secret, self.gw.engine)
        self._sealer = Sealer(derive_key(secret))
        self.store.start()

    @property
    def sealer(self) -> Sealer:
        assert self._sealer is not None, "ResponsesRuntime.start() runs at app start"
        return self._sealer

    def note_omitted(self, ctx: RequestContext, tools: list[str]) -> None:
        """Name the hosted tools left out: a response header always, a log line (INFO the first time
        per model and tool set, DEBUG after: Codex sends web_search on every request)."""
        names = ", ".join(sorted(set(tools)))
        ctx.omitted_tools = names
        key = (ctx.model or "", names)
        level = logging.DEBUG if key in self._noted else logging.INFO
        if len(self._noted) < MAX_NOTED:
            self._noted.add(key)
        log.log(level, "request %s: hosted tool(s) %s left out of the call to model %s (no upstream runs them; "
                "set hosted_tools: refuse on the model to answer 400 instead)", ctx.request_id, names, ctx.model)

    def keep(self, ctx: RequestContext, final: dict[str, Any], prep: rq.Prepared, history: list[dict[str, Any]],
             output_for_history: list[dict[str, Any]]) -> None:
        items = [_with_id(it) for it in prep.input_items]
        self.store.put(final["id"], ctx.principal.key_id, ctx.model, final, items, history, output_for_history)


def history_items(blocks: list[c.Block], prep: rq.Prepared, sealer: Sealer) -> list[dict[str, Any]]:
    """A whole reply's output as kept for the next turn: reasoning always sealed (with its signature)."""
    return ro.output_items(blocks, ro.Shape(prep.names, prep.summary, sealer.seal))


def history_from_output(tr: ChatToResponses, sealer: Sealer) -> list[dict[str, Any]]:
    shape = ro.Shape(tr.shape.names, tr.shape.summary, sealer.seal)
    return [ro.reasoning_item(it["id"], tr.thinking[i], shape) if i in tr.thinking else it
            for i, it in sorted(tr.output.items())]


def _with_id(item: dict[str, Any]) -> dict[str, Any]:
    if item.get("id"):
        return item
    prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}
    return {"id": ro.new_id(prefix.get(str(item.get("type", "message")), "item")), **item}


RUNTIME_KEY: web.AppKey[ResponsesRuntime] = web.AppKey("responses_runtime", ResponsesRuntime)


def install(app: web.Application) -> None:
    rt = ResponsesRuntime(app[GATEWAY_KEY])
    app[RUNTIME_KEY] = rt

    async def on_startup(_app: web.Application) -> None:
        await rt.start()

    async def on_cleanup(_app: web.Application) -> None:
        await rt.store.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.insert(0, on_cleanup)  # before the gateway closes the store's engine users


def runtime(app: web.Application) -> ResponsesRuntime:
    return app[RUNTIME_KEY]


# -- GET / DELETE -------------------------------------------------------------------------------
async def _owned(request: web.Request, endpoint: str) -> tuple[ResponsesRuntime, RequestContext, Any]:
    gw = request.app[GATEWAY_KEY]
    ctx = RequestContext(new_request_id(), "openai", endpoint, headers=request.headers)
    await gw.auth.authenticate(ctx)
    rt = runtime(request.app)
    rid = request.match_info["id"]
    s = await rt.store.get(rid, ctx.principal.key_id, wait_for_peers=False)
    if s is None:
        raise GatewayError(ErrorKind.NOT_FOUND, f"no stored response with id {rid!r} (never stored, deleted, expired, "
                           "or made by another key)", param="id", code="response_not_found")
    return rt, ctx, s


def _json(obj: Any) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type=JSON_CT)


async def retrieve(request: web.Request) -> web.Response:
    try:
        _rt, _ctx, s = await _owned(request, "responses_get")
    except GatewayError as e:
        return error_response(e, oai.error_body)
    return _json(s.response)


async def remove(request: web.Request) -> web.Response:
    try:
        rt, ctx, s = await _owned(request, "responses_delete")
        await rt.store.delete(s.id, ctx.principal.key_id)
    except GatewayError as e:
        return error_response(e, oai.error_body)
    return _json({"id": s.id, "object": "response", "deleted": True})


async def input_items(request: web.Request) -> web.Response:
    try:
        _rt, _ctx, s = await _owned(request, "responses_input_items")
        limit, order, after = _page_args(request)
    except GatewayError as e:
        return error_response(e, oai.error_body)
    items = list(s.input_items) if order == "asc" else list(reversed(s.input_items))
    if after is not None:
        ids = [it.get("id") for it in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return _json({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                  "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})


def _page_args(request: web.Request) -> tuple[int, str, str | None]:
    q = request.query
    try:
        limit = int(q.get("limit", "20"))
    except ValueError:
        raise invalid("'limit' must be a whole number from 1 to 100", param="limit") from None
    if not 1 <= limit <= 100:
        raise invalid("'limit' must be a whole number from 1 to 100", param="limit")
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid("'order' must be asc or desc", param="order")
    return limit, order, q.get("after")
