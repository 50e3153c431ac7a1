"""Helpers every API family uses: reading a JSON body safely, error responses, request ids."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from kaiyuan.codecs import DECODE_ERRORS, REQUEST_CODINGS, TooLarge, decode_all_turning
from kaiyuan.context import RequestContext
from kaiyuan.errors import NO_RETRY_STATUSES, ErrorKind, GatewayError, invalid
from kaiyuan.offload import OFF_LOOP_BYTES, loads_large, not_json

ErrorSerializer = Callable[[GatewayError], bytes]
JSON_CT = "application/json"


_ID_COUNTER = itertools.count(int.from_bytes(os.urandom(6), "big"))


def new_request_id() -> str:
    """``req_`` + 14 hex digits of the time in microseconds + 10 of a counter that starts at a
    random point per process: unique across processes and replicas, and time-ordered, so the
    request log's primary-key index is appended to rather than written at random places (half the
    database work per row), with no system call per request. Not a secret: it names the request."""
    return f"req_{time.time_ns() // 1000:014x}{next(_ID_COUNTER) & 0xFFFFFFFFFF:010x}"


async def read_json(request: web.Request, max_bytes: int, timeout_s: float = 60.0,
                    max_depth: int = 128) -> tuple[bytes, dict[str, Any]]:
    """The body as bytes and as a JSON object, or a 4xx that says what to fix: a body that does not
    arrive within ``timeout_s`` is a 408 (a slow sender must not hold a connection for ever), one
    nested deeper than ``max_depth`` a 400."""
    ctype = request.headers.get("Content-Type", "")
    if ctype and not ctype.split(";", 1)[0].strip().lower().endswith("json"):
        raise GatewayError(
            ErrorKind.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Type must be application/json, got {ctype!r}",
            code="unsupported_media_type",
        )
    length = request.content_length
    if length is not None and length > max_bytes:
        raise request_too_large(max_bytes)
    try:
        if request.content.is_eof():  # the whole body came with the head: nothing to wait for
            raw = await _read_limited(request, max_bytes)
        else:
            async with asyncio.timeout(timeout_s):
                raw = await _read_limited(request, max_bytes)
    except RequestPayloadError as e:
        raise invalid(f"the request body could not be read: {e}", code="invalid_body") from None
    except TimeoutError:
        raise GatewayError(ErrorKind.REQUEST_TIMEOUT, f"the request body did not arrive within {timeout_s:g}s "
                                                      f"(server.body_timeout_s)", code="request_timeout") from None
    encoding = request.headers.get("Content-Encoding")
    if encoding:
        raw = await decode_body(raw, encoding, max_bytes)
    if not raw:
        raise invalid("the request body is empty; send a JSON object", code="empty_body")
    large = len(raw) >= OFF_LOOP_BYTES
    if large:  # parsed a piece at a time, the loop turning in between (depth checked on the way)
        body = await loads_large(raw, max_depth, check_depth)
    else:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise not_json(e) from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", code="invalid_json")
    if not large and raw.count(b"[") + raw.count(b"{") > max_depth:  # fewer brackets cannot nest deeper
        check_depth(body, max_depth)
    return raw, body


ORJSON_MAX_DEPTH = 254  # orjson.dumps refuses deeper data (a TypeError: it used to surface as a 500)


def check_depth(body: Any, max_depth: int) -> None:
    """A 400 when ``body`` nests deeper than ``max_depth`` (arrays and objects). Deep data breaks
    serialising (orjson stops at 254 levels) and recursive walks (Python stops near 1000) later on;
    it is refused here, at C speed: orjson serialises the body under ``254 - max_depth`` wrapping
    levels and refuses it exactly when the body itself is deeper than ``max_depth``."""
    wrapped: Any = body
    for _ in range(ORJSON_MAX_DEPTH - max_depth):
        wrapped = (wrapped,)
    try:
        orjson.dumps(wrapped)
    except orjson.JSONEncodeError as e:
        if "Recursion" not in str(e):
            raise invalid(f"the request body cannot be processed: {e}", code="invalid_json") from None
        raise invalid(f"the request body is nested more than {max_depth} levels deep (server.max_json_depth)",
                      code="json_too_deep") from None


DECODABLE = REQUEST_CODINGS


async def decode_body(raw: bytes, encoding: str, max_bytes: int) -> bytes:
    """``raw`` decoded from its ``Content-Encoding`` (codings applied in order, undone in reverse),
    at most ``max_bytes`` once decoded (a 413, also for a small body that inflates past it: the
    decoders of :mod:`kaiyuan.codecs` stop there, they never inflate the whole bomb), with a turn of
    the event loop between two decoded pieces (a 26-byte br body that inflates to 16 MiB held the
    loop ~110 ms in one call).

    The server runs with aiohttp's own request decompression off (``server.app``), so that a coding
    it cannot decode is answered here, in the caller's dialect: a 415 listing what is accepted
    (RFC 7694 ``Accept-Encoding``), not aiohttp's plain-text 400."""
    for coding in _codings(encoding):
        try:
            raw = await decode_all_turning(raw, coding, max_bytes)
        except TooLarge:
            raise request_too_large(max_bytes) from None
        except DECODE_ERRORS as e:
            raise invalid(f"the request body could not be decoded as {coding}: {e}", code="invalid_body") from None
    return raw


def _codings(encoding: str) -> list[str]:
    """The codings of a ``Content-Encoding``, in the order to undo them; a 415 for one not decodable."""
    codings = [c.strip().lower() for c in encoding.split(",") if c.strip()]
    for coding in codings:
        if coding not in DECODABLE:
            raise GatewayError(
                ErrorKind.UNSUPPORTED_MEDIA_TYPE,
                f"Content-Encoding {coding[:64]!r} is not supported; send the body uncompressed or as "
                f"{', '.join(c for c in DECODABLE if c != 'identity')}",
                code="unsupported_content_encoding",
                headers={"Accept-Encoding": ", ".join(c for c in DECODABLE if c not in ("identity", "x-gzip"))},
            )
    return codings[::-1]


async def read_body(request: web.Request) -> bytes:
    """The whole body (aiohttp's ``client_max_size`` applies), decoded from its Content-Encoding:
    for the routes that do not go through :func:`read_json` (admin, trials)."""
    raw = await request.read()
    encoding = request.headers.get("Content-Encoding")
    return await decode_body(raw, encoding, request.client_max_size) if encoding else raw


def request_too_large(max_bytes: int) -> GatewayError:
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
            raise request_too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


_MODEL_FIELD = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')


class ModelRenamer:
    """Replies carry the public model name the caller sent, on every path (docs/translation.md):
    a pass-through stream's ``"model": "<upstream name>"`` is rewritten event by event. The first
    match is remembered, so later events cost one ``bytes.replace``."""

    __slots__ = ("new", "old")

    def __init__(self, public: str) -> None:
        self.new = b'"model":' + orjson.dumps(public)
        self.old: bytes | None = None

    def __call__(self, data: bytes, count: int = 1) -> bytes:
        """``data`` (one event; or several, with ``count=-1``) with the model name rewritten."""
        if self.old is None:
            m = _MODEL_FIELD.search(data)
            if m is None:
                return data
            self.old = m.group(0)
        return data.replace(self.old, self.new, count) if self.old != self.new else data


def with_public_model(obj: dict[str, Any] | None, data: bytes, public: str) -> bytes:
    """A whole pass-through reply with the public model name. ``obj`` is ``data`` parsed. When the
    body is compact JSON (no ``": "`` anywhere) in which the field appears once, the name is
    replaced in the bytes: that one match is the top-level field (a quote inside a string is
    escaped), and the upstream's bytes are kept as they are. Otherwise the body is re-serialised."""
    if obj is None or not isinstance(obj.get("model"), str) or obj["model"] == public:
        return data
    old = b'"model":' + orjson.dumps(obj["model"])
    if data.find(b'": ') < 0 and data.count(old) == 1:  # find, not `in` (docs/architecture.md)
        return data.replace(old, b'"model":' + orjson.dumps(public), 1)
    return orjson.dumps({**obj, "model": public})


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
    if ctx.served_model:
        h["x-kaiyuan-model"] = ctx.served_model
    if ctx.omitted_tools:  # /v1/responses: hosted tools left out of the upstream call
        h["x-kaiyuan-omitted-tools"] = ctx.omitted_tools
    return h


def error_response(err: GatewayError, serialize: ErrorSerializer, ctx: RequestContext | None = None) -> web.Response:
    headers = dict(err.headers)
    if err.status in NO_RETRY_STATUSES:
        headers.setdefault("x-should-retry", "false")
    if ctx is not None:
        headers.update(kaiyuan_headers(ctx))
    return web.Response(status=err.status, body=serialize(err), content_type=JSON_CT, headers=headers)


def client_gone(ctx: RequestContext) -> None:
    """Record that the client disconnected: a cancellation (499), unless it already had its whole
    answer and only hung up while the gateway was still reading the upstream to its end."""
    if ctx.answered or ctx.dropped:  # dropped: by the gateway (server.deadline)
        return
    ctx.cancelled = True
    ctx.status = 499
    ctx.error = "client disconnected"
