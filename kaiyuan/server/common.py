"""Helpers every API family uses: reading a JSON body safely, error responses, request ids."""

from __future__ import annotations

import os
import zlib
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
    except RequestPayloadError as e:
        raise invalid(f"the request body could not be read: {e}", code="invalid_body") from None
    encoding = request.headers.get("Content-Encoding")
    if encoding:
        raw = decode_body(raw, encoding, max_bytes)
    if not raw:
        raise invalid("the request body is empty; send a JSON object", code="empty_body")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise invalid(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", code="invalid_json")
    return raw, body


try:  # Brotli is optional, as for aiohttp: without it "br" bodies get a 415 like any unknown coding
    import brotli  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # pragma: no cover - depends on the environment
    try:
        import brotlicffi as brotli  # type: ignore[import-not-found, no-redef, unused-ignore]
    except ImportError:
        brotli = None

_DECODE_ERRORS: tuple[type[Exception], ...] = (zlib.error, ValueError) + ((brotli.error,) if brotli is not None else ())
DECODABLE = ("gzip", "x-gzip", "deflate", "identity") + (("br",) if brotli is not None else ())


def decode_body(raw: bytes, encoding: str, max_bytes: int) -> bytes:
    """``raw`` decoded from its ``Content-Encoding`` (codings applied in order, undone in reverse),
    at most ``max_bytes`` once decoded (a 413, also for a small body that inflates past it).

    The server runs with aiohttp's own request decompression off (``server.app``), so that a coding
    it cannot decode is answered here, in the caller's dialect: a 415 listing what is accepted
    (RFC 7694 ``Accept-Encoding``), not aiohttp's plain-text 400."""
    for coding in reversed([c.strip().lower() for c in encoding.split(",") if c.strip()]):
        if coding not in DECODABLE:
            raise GatewayError(
                ErrorKind.UNSUPPORTED_MEDIA_TYPE,
                f"Content-Encoding {coding!r} is not supported; send the body uncompressed or as "
                f"{', '.join(c for c in DECODABLE if c != 'identity')}",
                code="unsupported_content_encoding",
                headers={"Accept-Encoding": ", ".join(c for c in DECODABLE if c not in ("identity", "x-gzip"))},
            )
        try:
            if coding == "br":
                raw = brotli.decompress(raw)
            elif coding != "identity":
                raw = _inflate(raw, coding, max_bytes)
        except _DECODE_ERRORS as e:
            raise invalid(f"the request body could not be decoded as {coding}: {e}", code="invalid_body") from None
        if len(raw) > max_bytes:
            raise _too_large(max_bytes)
    return raw


def _inflate(raw: bytes, coding: str, max_bytes: int) -> bytes:
    if coding == "deflate":  # zlib-wrapped as the RFC says, or raw deflate as some clients send it
        wbits = zlib.MAX_WBITS if raw[:1] and raw[0] & 0x0F == 8 else -zlib.MAX_WBITS
    else:
        wbits = 16 + zlib.MAX_WBITS
    out: list[bytes] = []
    size = 0
    while raw:
        d = zlib.decompressobj(wbits)
        part = d.decompress(raw, max_bytes + 1 - size)
        size += len(part)
        if size > max_bytes:
            raise _too_large(max_bytes)
        out.append(part)
        if not d.eof:
            raise ValueError("the compressed data ends early")
        raw = d.unused_data if coding != "deflate" else b""  # gzip: concatenated members
    return b"".join(out)


async def read_body(request: web.Request) -> bytes:
    """The whole body (aiohttp's ``client_max_size`` applies), decoded from its Content-Encoding:
    for the routes that do not go through :func:`read_json` (admin, trials)."""
    raw = await request.read()
    encoding = request.headers.get("Content-Encoding")
    return decode_body(raw, encoding, request.client_max_size) if encoding else raw


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
    omitted = ctx.extra.get("omitted_tools")
    if omitted:  # /v1/responses: hosted tools left out of the upstream call
        h["x-kaiyuan-omitted-tools"] = omitted
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
