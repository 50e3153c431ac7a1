"""Closed connections do not pile up below the connection cap.

Found by bench/soak.py: the limiter remembered every connection's handler until the cap (half the
open-file limit: 500,000 with a high ulimit) was reached, so a client that opens a connection per
request grew the gateway by a few KiB per request. Now closed ones are swept whenever the count
doubles. Shown on a real aiohttp server socket with many short-lived connections."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from kaiyuan.server import connections
from kaiyuan.server.connections import ConnectionLimiter


async def _hello(request: web.BaseRequest) -> web.Response:
    return web.Response(text="ok")


async def _one_request(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = await reader.read()
    writer.close()
    return data


async def test_closed_connections_are_forgotten_below_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connections, "SWEEP_FLOOR", 32)
    monkeypatch.setattr(connections, "_FRESH_S", 0.0)  # the 1 s grace for unconnected handlers, off for speed
    loop = asyncio.get_running_loop()
    limiter = ConnectionLimiter(web.Server(_hello), 100_000, loop)
    server = await loop.create_server(limiter, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for _ in range(400):
            assert (await _one_request(port)).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.05)
        assert len(limiter.open) <= 32  # without the sweep: 400, one per connection ever made
        assert limiter.refused == 0 and limiter.evicted == 0
    finally:
        server.close()
        await server.wait_closed()


async def test_a_closed_connection_forgets_its_handler_at_once() -> None:
    """Below the sweep floor too (1,024 handlers): the soak's client opened ~170 connections in ten
    minutes, and each closed one held ~2 KiB for as long as the process ran."""
    loop = asyncio.get_running_loop()
    limiter = ConnectionLimiter(web.Server(_hello), 100_000, loop)
    server = await loop.create_server(limiter, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for _ in range(50):
            assert (await _one_request(port)).startswith(b"HTTP/1.1 200")
        held = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(200):  # until the server side has seen every close
            if len(limiter.open) == 1:
                break
            await asyncio.sleep(0.01)
        assert len(limiter.open) == 1  # only the connection still open; before: 51
        assert limiter.sweep_at == connections.SWEEP_FLOOR  # no sweep was needed
        held[1].close()
    finally:
        server.close()
        await server.wait_closed()


async def test_live_connections_are_kept_by_the_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connections, "SWEEP_FLOOR", 8)
    loop = asyncio.get_running_loop()
    limiter = ConnectionLimiter(web.Server(_hello), 100_000, loop)
    server = await loop.create_server(limiter, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
    try:
        await asyncio.sleep(0.05)
        assert len(limiter.open) == 20  # swept at 8 and 16: every one of them still open
        assert limiter.sweep_at == 32
    finally:
        for _, w in held:
            w.close()
        server.close()
        await server.wait_closed()
