"""Hand the C heap's free pages back to the OS every so often, so a gateway's RSS follows what it
holds, not the highest it ever held.

Why (issue 13, bench/RESULTS.md "Soak, round 4"): glibc's malloc keeps pages that were freed
inside its heaps (the main ``[heap]`` and one 64 MiB arena per thread that allocated: executor
threads, the log writer) unless the free block sits at the very top of the heap, and never trims a
thread's arena on its own. A burst (a stall elsewhere on the machine that piles up a few hundred
requests in flight, a database pass in an executor thread) leaves free but resident pages behind.
``malloc_trim(0)`` walks every arena and returns the whole free pages inside it (``MADV_DONTNEED``);
the memory the process still uses is untouched. It is not what made the soak's RSS creep (that was
state kept per closed connection and the console rollup in every worker): on its own it did not
change the soak's slope, and most of the 1-3 MiB it returns per pass is taken again within seconds.

It runs in the loop's default executor (ctypes releases the GIL; the loop thread keeps serving,
and waits only if it needs an arena's lock while that arena is trimmed). A pass over a gateway's
~100 MiB took 0.47 ms (median; at most 3.2 ms) in a soak. glibc only: elsewhere (musl,
macOS) there is no ``malloc_trim`` and this does nothing. ``server.malloc_trim_interval_s`` sets
the period; 0 turns it off.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import sys
from collections.abc import Callable

log = logging.getLogger("kaiyuan.memory")
Trim = Callable[[int], int]


def load_trim() -> Trim | None:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def start(interval_s: float, trim: Trim | None = None) -> asyncio.Task[None] | None:
    """The task that trims every ``interval_s`` seconds; None when off (0) or not glibc."""
    fn = trim if trim is not None else load_trim()
    if interval_s <= 0 or fn is None:
        return None
    return asyncio.create_task(trim_forever(interval_s, fn), name="kaiyuan-malloc-trim")


async def trim_forever(interval_s: float, trim: Trim) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval_s)
        try:
            await loop.run_in_executor(None, trim, 0)
        except RuntimeError:  # the executor is shutting down with the loop
            return
