"""providers.http.IdleWatch: a stream's idle timeout with one lazily re-armed timer."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp.base_protocol import BaseProtocol

from kaiyuan.providers.http import IdleWatch


class _Transport(asyncio.Transport):
    """Just enough of a connected transport for a StreamReader's protocol."""

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _reader() -> aiohttp.StreamReader:
    loop = asyncio.get_running_loop()
    proto = BaseProtocol(loop)
    proto.connection_made(_Transport())
    return aiohttp.StreamReader(proto, 2**16, loop=loop)


async def test_a_read_that_waits_past_idle_fails_with_a_timeout() -> None:
    reader = _reader()
    watch = IdleWatch(reader, 0.05)
    watch.last, watch.waiting = time.monotonic(), True
    with pytest.raises(aiohttp.ServerTimeoutError):
        await asyncio.wait_for(reader.readany(), 5)
    watch.stop()


async def test_data_that_keeps_coming_keeps_the_read_alive() -> None:
    reader = _reader()
    watch = IdleWatch(reader, 0.1)
    for i in range(6):  # 6 chunks, 0.03 s apart: 0.18 s in all, never 0.1 s without one
        watch.last, watch.waiting = time.monotonic(), True
        asyncio.get_running_loop().call_later(0.03, reader.feed_data, b"x%d" % i)
        assert await asyncio.wait_for(reader.readany(), 5) == b"x%d" % i
        watch.waiting = False
    assert reader.exception() is None
    watch.stop()


async def test_time_the_gateway_spends_not_reading_is_not_the_upstreams_silence() -> None:
    reader = _reader()
    watch = IdleWatch(reader, 0.05)
    watch.waiting = False  # a slow client: the relay is not reading
    await asyncio.sleep(0.2)  # four idle periods pass
    assert reader.exception() is None
    reader.feed_data(b"late")
    watch.last, watch.waiting = time.monotonic(), True
    assert await reader.readany() == b"late"
    watch.stop()
    assert watch.handle is None
