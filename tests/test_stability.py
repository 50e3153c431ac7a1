"""A few thousand mixed good and bad requests: the gateway neither crashes nor leaks memory or connections."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp
import psutil

from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI
from kaiyuan.testing.harness import GatewayProcess
from tests.conftest import openai_model

GOOD = {"model": "m", "messages": [{"role": "user", "content": "steady as she goes"}]}


async def one(s: aiohttp.ClientSession, url: str, kind: int) -> int:
    path = url + "/v1/chat/completions"
    if kind == 0:
        async with s.post(path, json=GOOD) as r:
            await r.read()
            return r.status
    if kind == 1:
        async with s.post(path, json={**GOOD, "stream": True}) as r:
            await r.read()
            return r.status
    if kind == 2:
        async with s.post(path, data=b"{broken", headers={"Content-Type": "application/json"}) as r:
            await r.read()
            return r.status
    if kind == 3:
        async with s.post(path, json={**GOOD, "model": "unknown"}) as r:
            await r.read()
            return r.status
    if kind == 4:  # disconnect mid-stream
        r = await s.post(path, json={**GOOD, "stream": True})
        await r.content.readany()
        r.close()
        return 499
    async with s.post(path, json={**GOOD, "max_tokens": "x"}) as r:
        await r.read()
        return r.status


async def blast(url: str, n: int, concurrency: int, seed: int) -> dict[int, int]:
    rng = random.Random(seed)
    kinds = [rng.randrange(6) for _ in range(n)]
    sem = asyncio.Semaphore(concurrency)
    counts: dict[int, int] = {}
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as s:

        async def run(k: int) -> None:
            async with sem:
                st = await one(s, url, k)
                counts[st] = counts.get(st, 0) + 1

        await asyncio.gather(*(run(k) for k in kinds))
    return counts


def snapshot(p: psutil.Process, port: int) -> tuple[int, int, int]:
    """RSS, open client connections to the gateway, and pooled connections to upstreams."""
    conns = [c for c in p.net_connections(kind="tcp") if c.status not in (psutil.CONN_LISTEN, psutil.CONN_CLOSE)]
    inbound = sum(1 for c in conns if c.laddr and c.laddr.port == port)
    return p.memory_info().rss, inbound, len(conns) - inbound


async def settle(p: psutil.Process, port: int) -> tuple[int, int, int]:
    snap = snapshot(p, port)
    for _ in range(100):  # sockets of finished clients close on their own; wait for them
        snap = snapshot(p, port)
        if snap[1] == 0:
            break
        await asyncio.sleep(0.1)
    return snap


async def test_mixed_load_returns_to_baseline(servers: Any, fake_openai: FakeOpenAI, tmp_path: Any) -> None:
    fake_openai.default = Behaviour(fail_rate=0.1, status_on_fail=500)
    gw = GatewayProcess({"store": {"url": f"sqlite:///{tmp_path}/s.db"}, "models": [openai_model("m", fake_openai.url)]}, str(tmp_path))
    try:
        gw.wait_ready()
        p = psutil.Process(gw.proc.pid)
        await blast(gw.url, 600, 64, seed=1)  # warm up pools, caches, allocator
        rss0, in0, _ = await settle(p, gw.port)
        counts = await blast(gw.url, 3000, 64, seed=2)
        rss1, in1, out1 = await settle(p, gw.port)
        assert gw.proc.poll() is None, "the gateway is still running"
        assert set(counts) <= {200, 400, 404, 499, 500}, counts
        assert counts.get(200, 0) > 500 and counts.get(400, 0) > 500
        assert in0 == 0 and in1 == 0, f"client connections left open: {in0} -> {in1}"
        assert out1 <= 64 + 2, f"upstream pool holds {out1} connections, more than the load's concurrency"
        assert rss1 - rss0 < 40 * 1024 * 1024, f"RSS grew {(rss1 - rss0) / 1e6:.1f} MB"
        async with aiohttp.ClientSession() as s, s.get(gw.url + "/healthz") as r:
            assert r.status == 200
    finally:
        assert gw.stop() == 0
