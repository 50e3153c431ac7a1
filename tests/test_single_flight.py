"""Under load, an expired key or budget seed is loaded once, not once per waiting request."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from kaiyuan.accounting.auth import SingleFlight


async def test_concurrent_callers_share_one_load() -> None:
    calls = 0
    lock = threading.Lock()

    def load(x: int) -> int:
        nonlocal calls
        with lock:
            calls += 1
        time.sleep(0.05)  # a slow database read
        return x * 2

    sf = SingleFlight()
    results = await asyncio.gather(*(sf.run("k", load, 21) for _ in range(200)))
    assert results == [42] * 200
    assert calls == 1
    assert await sf.run("k", load, 1) == 2 and calls == 2  # a later call loads afresh


async def test_a_cancelled_waiter_does_not_cancel_the_others() -> None:
    def load() -> str:
        time.sleep(0.05)
        return "ok"

    sf = SingleFlight()
    first = asyncio.ensure_future(sf.run("k", load))
    second = asyncio.ensure_future(sf.run("k", load))
    await asyncio.sleep(0.01)
    first.cancel()
    assert await second == "ok"
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_errors_reach_every_waiter_and_are_not_cached() -> None:
    n = 0

    def load() -> str:
        nonlocal n
        n += 1
        time.sleep(0.02)
        if n == 1:
            raise RuntimeError("database down")
        return "ok"

    sf = SingleFlight()
    res = await asyncio.gather(*(sf.run("k", load) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in res)
    assert await sf.run("k", load) == "ok"
