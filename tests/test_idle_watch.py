"""providers.http.IdleWatch: a stream's idle timeout with one lazily re-armed timer."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp.base_protocol import BaseProtocol

from kaiyuan.errors import GatewayError
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


# -- the transport's reader (providers.http.UpstreamChunks): its idle timer ends with the stream -----

async def _serve(events: list[bytes], hold: asyncio.Event) -> tuple[aiohttp.web.AppRunner, str]:
    from aiohttp import web

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for ev in events:
            await resp.write(ev)
        await hold.wait()  # the rest of the stream comes when the test says so
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/v1/chat/completions"


@pytest.mark.parametrize("end", ["eof", "finished", "closed", "idle"])
async def test_the_readers_idle_timer_ends_with_the_stream(end: str) -> None:
    """However a stream ends (read to its end, finished by the relay at its last event, cancelled,
    or failed at the idle timeout), its reader leaves no timer behind: the relay holds no generator
    whose collection used to stop it."""
    from kaiyuan.config import Timeouts
    from kaiyuan.providers.http import UpstreamChunks, make_session, post_json

    hold = asyncio.Event()
    if end == "eof":
        hold.set()
    runner, url = await _serve([b"data: {\"a\":1}\n\n", b"data: [DONE]\n\n"], hold)
    timeouts = Timeouts(idle=0.2 if end == "idle" else 5)
    session = make_session(4, timeouts)
    try:
        reply = await post_json(session, url, b"{}", {}, timeouts, True, "test")
        chunks = reply.stream
        assert isinstance(chunks, UpstreamChunks) and chunks.watch.handle is not None
        got = await chunks.__anext__()
        chunks.unread(got)  # as the executor does with the first chunk
        data = b""
        if end == "eof":
            async for c in chunks:
                data += c
            assert data.endswith(b"data: [DONE]\n\n") and chunks.received == len(data)
        elif end == "idle":
            with pytest.raises(GatewayError, match=r"timeouts\.idle"):
                while True:
                    await chunks.__anext__()
        else:
            await reply.aclose(finished=end == "finished")
        assert chunks.watch.handle is None
    finally:
        hold.set()
        await session.close()
        await runner.cleanup()
