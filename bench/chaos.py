"""Chaos benchmark: drive load through the gateway while its upstreams misbehave.

Everything runs on 127.0.0.1 in this process: fake OpenAI-compatible upstreams with injected
faults, the gateway (in a background event-loop thread) and an aiohttp client. The run is bounded
by a request count and a wall-clock limit. Two gateway configurations see the same faults:

- ``routing``: the defaults of docs/routing.md (retries, breakers) plus a fallback model;
- ``baseline``: one attempt per request, no breaker, no fallback (what a plain proxy does).

Faults on model ``chat``'s deployments:
- ``flaky``: 30% of answers are 500s;
- ``limited``: 20% of answers are 429 with ``Retry-After: 1``;
- ``stalling``: 5% hang before the first byte (timeouts.first_byte 0.5 s), 5% drop the stream
  after two chunks, 5% stall mid-stream (timeouts.idle 0.5 s), the rest answer with 20 ms per chunk;
- ``dead``: nothing listens on its port.
Fallback model ``backup`` has one healthy deployment.

Reports the client-visible error rate, p50/p99 latency and attempts per request.

    python bench/chaos.py --requests 1500 --concurrency 24 --max-seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI
from kaiyuan.testing.harness import RunningGateway, start_gateway
from kaiyuan.testing.server_thread import ServerThread


class ChaosUpstream(FakeOpenAI):
    """A fake upstream that picks each request's behaviour at random from a weighted mix."""

    def __init__(self, mix: list[tuple[float, Behaviour]], seed: int) -> None:
        super().__init__(api_key="sk-upstream", seed=seed)
        self.mix = mix
        self.pick = random.Random(seed + 1000)

    def _behaviour(self) -> Behaviour:
        r = self.pick.random()
        for p, b in self.mix:
            if r < p:
                return b
            r -= p
        return self.default


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_config(urls: dict[str, str], mode: str) -> dict[str, Any]:
    def dep(name: str, url: str, **kw: Any) -> dict[str, Any]:
        return {"provider": "openai_compatible", "base_url": url + "/v1", "model": "up-" + name, "api_key": "sk-upstream", "id": name,
                "timeouts": {"connect": 0.5, "first_byte": 0.5, "idle": 0.5, "total": 10}, **kw}

    chat: dict[str, Any] = {"name": "chat", "deployments": [
        dep("flaky", urls["flaky"]), dep("limited", urls["limited"]), dep("stalling", urls["stalling"]), dep("dead", urls["dead"])]}
    backup = {"name": "backup", "deployments": [dep("backup", urls["backup"])]}
    if mode == "baseline":
        chat["routing"] = {"retries": {"max_attempts": 1}, "breaker": {"enabled": False}}
    else:
        chat["routing"] = {"fallbacks": ["backup"], "retries": {"max_attempts": 3, "max_total_s": 10},
                           "breaker": {"failures": 10, "window_s": 10, "cooldown_s": 5}}
    return {"request_log": {"enabled": False}, "models": [chat, backup]}


async def one(session: aiohttp.ClientSession, url: str, stream: bool, i: int) -> tuple[bool, float, int, str]:
    body = {"model": "chat", "messages": [{"role": "user", "content": f"request {i} says hello to the gateway"}], "stream": stream}
    t0 = time.perf_counter()
    try:
        async with session.post(url, json=body) as r:
            attempts = int(r.headers.get("x-kaiyuan-attempts", "0"))
            dep = r.headers.get("x-kaiyuan-deployment", "")
            data = await r.read()
            ok = r.status == 200
            if ok and stream:
                ok = data.rstrip().endswith(b"data: [DONE]") and b'"error"' not in data
            elif ok:
                ok = b"echo: request" in data
            label = dep if ok else ("stream ended with an error event" if r.status == 200 else f"HTTP {r.status}")
            return ok, time.perf_counter() - t0, attempts, label
    except (TimeoutError, aiohttp.ClientError) as e:
        return False, time.perf_counter() - t0, 0, f"client {type(e).__name__}"


async def drive(gw_url: str, n: int, concurrency: int, max_seconds: float, stream_share: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    url = gw_url + "/v1/chat/completions"
    results: list[tuple[bool, float, int, str]] = []
    deadline = time.monotonic() + max_seconds
    counter = iter(range(n))
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker() -> None:
            for i in counter:
                if time.monotonic() >= deadline:
                    return
                results.append(await one(session, url, rng.random() < stream_share, i))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = sorted(r[1] for r in results)
    attempts = [r[2] for r in results if r[2]]
    errors = [r for r in results if not r[0]]
    return {
        "requests": len(results),
        "client_errors": len(errors),
        "error_rate": round(len(errors) / max(len(results), 1), 5),
        "error_kinds": dict(Counter(r[3] for r in errors).most_common(5)),
        "p50_ms": round(statistics.median(lat) * 1000, 1) if lat else None,
        "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 1) if lat else None,
        "attempts_per_request": round(sum(attempts) / max(len(attempts), 1), 3),
        "max_attempts": max(attempts, default=0),
        "served_by": dict(Counter(r[3] for r in results if r[0]).most_common()),
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(results) / wall, 1) if wall else None,
    }


def run(mode: str, args: argparse.Namespace, servers: ServerThread, urls: dict[str, str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        gw: RunningGateway = start_gateway(servers, build_config(urls, mode), f"sqlite:///{tmp}/chaos.db")
        try:
            report = asyncio.run(drive(gw.url, args.requests, args.concurrency, args.max_seconds, args.stream_share, args.seed))
            report["breaker_changes"] = _state_changes(gw)
            report["deployments"] = {d["deployment"]: {"state": d["state"], "successes": d["successes"], "errors": d["errors"]}
                                     for d in gw.gateway.router.describe() if d["model"] == "chat"}
        finally:
            for r in list(servers._runners):
                if r.app is not None and any(v is gw.gateway for v in r.app.values()):
                    servers.call(r.cleanup())
                    servers._runners.remove(r)
    return report


def _state_changes(gw: RunningGateway) -> int:
    total = 0
    for metric in gw.gateway.metrics.registry.collect():
        if metric.name == "kaiyuan_deployment_state_changes":
            total += int(sum(s.value for s in metric.samples if s.name.endswith("_total")))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1500, help="requests per mode (bounded)")
    ap.add_argument("--concurrency", type=int, default=24)
    ap.add_argument("--max-seconds", type=float, default=60, help="wall-clock bound per mode")
    ap.add_argument("--stream-share", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--modes", default="baseline,routing")
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args()
    args.requests = min(args.requests, 20000)
    args.max_seconds = min(args.max_seconds, 300)

    servers = ServerThread()
    try:
        fakes = {
            "flaky": ChaosUpstream([(0.3, Behaviour(status=500))], 1),
            "limited": ChaosUpstream([(0.2, Behaviour(status=429, headers={"Retry-After": "1"}))], 2),
            "stalling": ChaosUpstream([(0.05, Behaviour(delay_first_byte=5)), (0.05, Behaviour(drop_after_chunks=2)),
                                       (0.05, Behaviour(stall_after_chunks=3))], 3),
            "backup": ChaosUpstream([], 4),
        }
        fakes["stalling"].default = Behaviour(chunk_delay=0.02)
        urls = {name: servers.serve(f.app, handler_cancellation=True) for name, f in fakes.items()}
        urls["dead"] = f"http://127.0.0.1:{free_port()}"
        report = {"command": " ".join(["python", *sys.argv]), "modes": {}}
        for mode in args.modes.split(","):
            report["modes"][mode] = run(mode, args, servers, urls)
            print(f"{mode}: {json.dumps(report['modes'][mode])}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    finally:
        servers.close()


if __name__ == "__main__":
    main()
