"""Large bodies are worked on off the event loop, small ones inline.

Translating a body between dialects (caller's dialect -> canonical -> the upstream's, and the
reply back), validating it and counting its tokens are pure Python, linear in its messages and
content blocks: a 13 MiB translated body held the event loop for seconds (issue 9), and every other
request waited. From :data:`OFF_LOOP_BYTES` of body on, that work runs in a worker thread
(``asyncio.to_thread``): the loop thread gets the GIL back at every switch interval (5 ms) and
keeps serving. Below it the work stays inline: a thread hop (~50-100 µs) costs more than
translating a small body, and the plain path must not get slower.

What does not move: orjson parsing and serialising are C code that keeps the GIL for the whole
call (about 10-25 ms per MiB of object-dense JSON), so their stall is bounded by
``server.max_body_bytes`` and ``max_response_bytes``, not removed; a tokenizer call on one long
string holds it too (about 20 ms per MiB).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

OFF_LOOP_BYTES = 1024 * 1024  # a body this large (raw bytes) is worked on in a worker thread


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
