"""Large bodies are worked on off the event loop, small ones inline.

Translating a body between dialects (caller's dialect -> canonical -> the upstream's, and the
reply back), validating it and counting its tokens are pure Python, linear in its messages and
content blocks: a 13 MiB translated body held the event loop for seconds (issue 9), and every other
request waited. From :data:`OFF_LOOP_BYTES` of body on, that work runs in a worker thread
(``asyncio.to_thread``): the loop thread gets the GIL back at every switch interval (5 ms) and
keeps serving. Below it the work stays inline: a thread hop (~50-100 µs) costs more than
translating a small body, and the plain path must not get slower.

Parsing a large request body cannot go to a thread: orjson is C code that keeps the GIL for the
whole call (measured: a 15 MiB body parsed in a worker thread left the loop without a single turn
for the whole 0.1-0.3 s of the parse). So :func:`loads_large` parses it *in pieces*, on the loop,
with a turn of the loop between two pieces: msgspec finds where each member of an object and each
element of an array begins and ends (``msgspec.Raw``: a C scan, about 1 ms per MiB, that builds
nothing), and orjson parses each piece of at most :data:`PIECE_BYTES`; larger members are split
again. Every byte is still parsed once, by orjson, with orjson's rules. A large whole upstream
reply is parsed the same way (:func:`loads_in_pieces`, from ``routing.executor``).

What does not move: serialising (orjson.dumps) of a large body, and a tokenizer call on one long
string (about 20 ms per MiB); both are bounded by ``server.max_body_bytes``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, ParamSpec, TypeVar

import msgspec
import orjson

from kaiyuan.errors import GatewayError, invalid

P = ParamSpec("P")
T = TypeVar("T")

OFF_LOOP_BYTES = 1024 * 1024  # a body this large (raw bytes) is worked on in a worker thread
PIECE_BYTES = 256 * 1024  # at most this much JSON parsed in one step of loads_large (about 2-6 ms)


def big(size: int) -> bool:
    return size >= OFF_LOOP_BYTES


def maybe_off_loop(size: int, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T | Awaitable[T]:
    """``fn(...)`` now for a small body; for a body of ``size >= OFF_LOOP_BYTES``, an awaitable that
    runs it in a worker thread (for callers that may return either, such as an executor's ``build``)."""
    if size < OFF_LOOP_BYTES:
        return fn(*args, **kwargs)
    return asyncio.to_thread(fn, *args, **kwargs)


async def off_loop(size: int, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(...)``: inline for a small body, in a worker thread for a large one."""
    if size < OFF_LOOP_BYTES:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


# -- a large JSON body, parsed a piece at a time --------------------------------------------------
DepthCheck = Callable[[Any, int], None]  # (value, max depth) -> None, or a 400 (server.common.check_depth)
_MEMBERS = msgspec.json.Decoder(dict[str, msgspec.Raw])  # an object's members, each left unparsed
_ELEMENTS = msgspec.json.Decoder(list[msgspec.Raw])  # an array's elements, each left unparsed


def not_json(e: Exception) -> GatewayError:
    return invalid(f"the request body is not valid JSON: {e}", code="invalid_json")


async def loads_large(raw: bytes, max_depth: int, check_depth: DepthCheck) -> Any:
    """``orjson.loads(raw)``, with a turn of the event loop after every :data:`PIECE_BYTES` parsed,
    and ``raw`` nested at most ``max_depth`` levels deep (``check_depth`` is applied to each piece
    where it sits in the whole). Invalid JSON is a 400, as for a small body."""
    try:
        return await _Pieces(max_depth, check_depth).value(raw, 0)
    except JSON_ERRORS as e:
        raise not_json(e) from None
    except RecursionError:  # msgspec's scan of a piece nested about 1,000 levels deep
        raise invalid(f"the request body is nested more than {max_depth} levels deep (server.max_json_depth)",
                      code="json_too_deep") from None


JSON_ERRORS = (msgspec.DecodeError, orjson.JSONDecodeError)


def _no_check(_value: Any, _max_depth: int) -> None:
    return None


async def loads_in_pieces(raw: bytes) -> Any:
    """``orjson.loads(raw)`` for a large upstream reply, a piece at a time (as :func:`loads_large`),
    with orjson's own limits on depth; raises :data:`JSON_ERRORS` or RecursionError."""
    return await _Pieces(1 << 20, _no_check).value(raw, 0)


def _opening(buf: Any) -> bytes:
    """The first byte of the JSON value in ``buf`` (whitespace skipped within its first 4 KiB)."""
    return bytes(memoryview(buf)[:4096]).lstrip()[:1]


class _Pieces:
    """One large body's parse: a container larger than a piece is split (msgspec), everything else
    parsed (orjson); the loop turns after every PIECE_BYTES parsed and after every split."""

    __slots__ = ("check", "max_depth", "parsed")

    def __init__(self, max_depth: int, check: DepthCheck) -> None:
        self.max_depth = max_depth
        self.check = check
        self.parsed = 0  # bytes parsed since the loop's last turn

    async def value(self, buf: Any, depth: int) -> Any:
        """The value in ``buf`` (bytes, or a ``msgspec.Raw`` of the body), ``depth`` levels down."""
        if len(buf) > PIECE_BYTES:
            opening = _opening(buf)
            if opening in (b"{", b"["):
                if depth >= self.max_depth:
                    raise invalid(f"the request body is nested more than {self.max_depth} levels deep "
                                  f"(server.max_json_depth)", code="json_too_deep")
                if opening == b"{":
                    members = _MEMBERS.decode(buf)
                    await asyncio.sleep(0)  # the scan took about 1 ms per MiB
                    return dict(zip(members, await self.parts(members.values(), depth + 1), strict=True))
                elements = _ELEMENTS.decode(buf)
                await asyncio.sleep(0)
                return await self.parts(elements, depth + 1)
        obj = self.leaf(buf, depth)
        await self.turn()
        return obj

    async def parts(self, bufs: Iterable[Any], depth: int) -> list[Any]:
        out = []
        for buf in bufs:
            if len(buf) > PIECE_BYTES:
                out.append(await self.value(buf, depth))
            else:  # inline: no coroutine per small element
                out.append(self.leaf(buf, depth))
                if self.parsed >= PIECE_BYTES:
                    await self.turn()
        return out

    async def turn(self) -> None:
        if self.parsed >= PIECE_BYTES:
            self.parsed = 0
            await asyncio.sleep(0)

    def leaf(self, buf: Any, depth: int) -> Any:
        data = buf if isinstance(buf, bytes) else bytes(buf)
        obj = orjson.loads(data)
        self.parsed += len(data)
        if data.count(b"[") + data.count(b"{") > self.max_depth - depth:  # fewer cannot nest deeper
            placed: Any = obj
            for _ in range(depth):  # the piece where it sits in the body
                placed = (placed,)
            self.check(placed, self.max_depth)
        return obj
