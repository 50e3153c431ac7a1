"""How long one bad request holds the gateway's event loop (issue 9, "more blocking on the event loop").

    PYTHONPATH=$PWD .venv/bin/python bench/loop_stall.py [error60 bomb bomb-stream translated ...]

Starts the gateway (in-process, on its own loop thread) and a hostile upstream on another loop
thread, sends one bad request, and meanwhile samples the gateway loop: a task that sleeps 5 ms and
records how late it woke. Prints, per scenario, the longest stall, the count over 50 ms, the
request's status and time, and the process's peak RSS. Scenarios:

- ``error60``: the upstream answers 500 with a 60 MiB body (cut at ``max_error_bytes`` now);
- ``bomb``: a 200 whose gzip body inflates to 1 GiB (1 MB on the wire; ``max_response_bytes`` 64 MiB);
- ``bomb-stream``: a gzip SSE stream of 2 million events (288 MB inflated, 1 MB on the wire);
- ``translated``: an Anthropic ``/v1/messages`` body of 13 MiB in 60,000 messages to an
  OpenAI-compatible deployment (translated both ways).

The upstream shares the process (and so the GIL): its own work shows up in the stalls a little.
Run it on a quiet machine; compare two checkouts with their own PYTHONPATH.
"""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from kaiyuan.testing.harness import start_gateway
from kaiyuan.testing.server_thread import ServerThread

EVENT = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":'
         b'[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}\n\n')
COMPLETION = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
SCENARIOS = ("error60", "bomb", "bomb-stream", "translated")


def gzipped(unit: bytes, times: int, head: bytes = b"") -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    return z.compress(head) + b"".join(z.compress(unit) for _ in range(times)) + z.flush()


class Upstream:
    def __init__(self, scenario: str) -> None:
        self.scenario = scenario
        self.bomb = gzipped(b"0" * (1 << 20), 1024, b'{"id": "') if scenario == "bomb" else b""
        self.stream = gzipped(EVENT, 2_000_000) if scenario == "bomb-stream" else b""
        self.app = web.Application(client_max_size=1 << 30)
        self.app.router.add_route("POST", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        if self.scenario == "error60":
            body = b'{"error": {"message": "' + b"e" * (60 << 20) + b'"}}'
            return web.Response(status=500, body=body, content_type="application/json")
        if self.scenario == "bomb":
            return web.Response(body=self.bomb, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
        if self.scenario == "bomb-stream":
            resp = web.StreamResponse(headers={"Content-Encoding": "gzip", "Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(self.stream)
            await resp.write_eof()
            return resp
        return web.json_response(COMPLETION)


def request_for(scenario: str) -> tuple[str, bytes]:
    if scenario == "translated":
        msgs: list[dict[str, Any]] = [
            {"role": "user" if i % 2 == 0 else "assistant",
             "content": [{"type": "text", "text": "x " * 55}, {"type": "text", "text": "y " * 55}]}
            for i in range(60_000)]
        msgs.append({"role": "user", "content": "end"})
        return "/v1/messages", orjson.dumps({"model": "m", "max_tokens": 10, "messages": msgs})
    stream = scenario == "bomb-stream"
    return "/v1/chat/completions", orjson.dumps({"model": "m", "stream": stream,
                                                 "messages": [{"role": "user", "content": "hi"}]})


def run(scenario: str) -> None:
    gws, ups = ServerThread(), ServerThread()
    up = Upstream(scenario)
    url = ups.serve(up.app)
    one = {"retries": {"max_attempts": 1}}
    cfg = {"server": {"max_body_bytes": 64 << 20}, "models": [{"name": "m", "routing": one, "deployments": [
        {"provider": "openai_compatible", "base_url": url + "/v1", "model": "m", "api_key": "k", "price": {"input": 0, "output": 0}}]}]}
    gw = start_gateway(gws, cfg, f"sqlite:///{tempfile.mkdtemp()}/k.db")
    gaps: list[float] = []

    async def sample(stop: asyncio.Event) -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last - 0.005)
            last = now

    async def send() -> tuple[int, int, float]:
        path, body = request_for(scenario)
        t0 = time.perf_counter()
        async with aiohttp.ClientSession() as s, s.post(gw.url + path, data=body,
                                                        headers={"Content-Type": "application/json"}) as r:
            data = await r.read()
        return r.status, len(data), time.perf_counter() - t0

    stop = asyncio.Event()
    sampler = asyncio.run_coroutine_threadsafe(sample(stop), gws.loop)
    status, size, took = asyncio.run(send())
    gws.loop.call_soon_threadsafe(stop.set)
    sampler.result(10)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"| {scenario} | {max(gaps) * 1000:.0f} ms | {sum(g > 0.05 for g in gaps)} | {status} ({size} bytes) "
          f"| {took:.2f} s | {rss} MiB |", flush=True)
    gws.close()
    ups.close()


def main() -> None:
    chosen = sys.argv[1:] or list(SCENARIOS)
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    if len(chosen) == 1:
        run(chosen[0])
        return
    print("| scenario | longest loop stall | stalls > 50 ms | answer | time | peak RSS |")
    print("|---|---|---|---|---|---|", flush=True)
    for s in chosen:  # one process each: the peak RSS is the scenario's own
        subprocess.run([sys.executable, __file__, s], check=True)


if __name__ == "__main__":
    main()
