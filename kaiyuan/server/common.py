"""Helpers every API family uses: reading a JSON body safely, error responses, request ids."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from kaiyuan.context import RequestContext
from kaiyuan.errors import ErrorKind, GatewayError, invalid

ErrorSerializer = Callable[[GatewayError], bytes]
JSON_CT = "application/json"


def new_request_id() -> str:
    return "req_" + os.urandom(12).hex()


async def read_json(request: web.Request, max_bytes: int) -> tuple[bytes, dict[str, Any]]:
    """The body as bytes and as a JSON object, or a 4xx that says what to fix."""
    ctype = request.headers.get("Content-Type", "")
    if ctype and not ctype.split(";", 1)[0].strip().lower().endswith("json"):
        raise GatewayError(
            ErrorKind.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Type must be application/json, got {ctype!r}",
            code="unsupported_media_type",
        )
    length = request.content_length
    if length is not None and length > max_bytes:
        raise _too_large(max_bytes)
    try:
        raw = await _read_limited(request, max_bytes)
    except RequestPayloadError as e:  # e.g. a Content-Encoding: gzip body that is not gzip
        raise invalid(f"the request body could not be read: {e}", code="invalid_body") from None
    if not raw:
        raise invalid("the request body is empty; send a JSON object", code="empty_body")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise invalid(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", code="invalid_json")
    return raw, body


def _too_large(max_bytes: int) -> GatewayError:
    return GatewayError(
        ErrorKind.REQUEST_TOO_LARGE,
        f"the request body is larger than this gateway's limit of {max_bytes} bytes (server.max_body_bytes)",
        code="request_too_large",
    )


async def _read_limited(request: web.Request, max_bytes: int) -> bytes:
    if request.content_length is not None:
        return await request.read()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def kaiyuan_headers(ctx: RequestContext) -> dict[str, str]:
    h = {"x-kaiyuan-request-id": ctx.request_id}
    if ctx.deployment:
        h["x-kaiyuan-deployment"] = ctx.deployment
    if ctx.attempts:
        h["x-kaiyuan-attempts"] = str(len(ctx.attempts))
    if ctx.cost_usd is None and ctx.pricer is not None and ctx.usage.prompt_tokens is not None:
        ctx.cost_usd = ctx.pricer(ctx)  # usage is known: a whole (non-streamed) answer
    if ctx.cost_usd is not None:
        h["x-kaiyuan-cost"] = f"{ctx.cost_usd:.8f}".rstrip("0").rstrip(".") or "0"
    served = ctx.extra.get("served_model")
    if served:
        h["x-kaiyuan-model"] = served
    return h


def error_response(err: GatewayError, serialize: ErrorSerializer, ctx: RequestContext | None = None) -> web.Response:
    headers = dict(err.headers)
    if ctx is not None:
        headers.update(kaiyuan_headers(ctx))
    return web.Response(status=err.status, body=serialize(err), content_type=JSON_CT, headers=headers)


def client_gone(ctx: RequestContext) -> None:
    """Record that the client disconnected: a cancellation (499), unless it already had its whole
    answer and only hung up while the gateway was still reading the upstream to its end."""
    if ctx.extra.get("answered"):
        return
    ctx.cancelled = True
    ctx.status = 499
    ctx.error = "client disconnected"
