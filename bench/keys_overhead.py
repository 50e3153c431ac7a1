"""What auth + rate limits + budget add per request: the guard's admit + settle, timed in-process.

    PYTHONPATH=. python -m bench.keys_overhead [--redis redis://127.0.0.1:6379/0] [-n 20000] [-c 1]

Variants: the master key (a constant-time compare), a virtual key with RPM + TPM + a monthly
budget on in-process counters (one node), and the same on Redis (one EVALSHA on admit; the settle
is queued and applied in batches by a background task, whose work still runs on this event loop and
so is included in the times). The key is cached (the steady state); the database is not touched.
Numbers are per request (admit + settle, ``-c`` requests at a time), on one core, and exclude the
HTTP server and the upstream (see bench/run.py for those). With Redis it also prints how many
settle EVALSHAs the requests took (``batches``). ``--gap-ms`` pauses between a worker's requests,
outside the timed window, like a client's turn-around: it lets background settles finish off the
path, which is what a real request path sees.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from typing import Any

import orjson

from kaiyuan.accounting import keystore
from kaiyuan.config import parse_config
from kaiyuan.context import RequestContext, Usage
from kaiyuan.gateway import Gateway
from kaiyuan.pipeline import settle
from kaiyuan.store.db import open_store

MASTER = "sk-bench-master"
BODY = {"model": "bench", "messages": [{"role": "user", "content": "Say hello to the benchmark in one short sentence."}], "max_tokens": 64}
RAW_BODY = orjson.dumps(BODY)  # settle checks reported usage against the request's size


def key_setup(base_url: str, master_key: str = MASTER) -> dict[str, str]:
    """For bench/run.py variants: create a virtual key with RPM + TPM + a monthly budget (limits far
    above what the benchmark sends, so every request pays for the checks but none is refused) and
    return the headers that use it. Example (bench/scenarios.py)::

        PRICES = {"prices_file": "bench/prices.yaml"}  # the fake upstream's models need a price for budgets
        Variant("kaiyuan+keys-sqlite", config_patch={"server": {"master_key": MASTER_KEY}, "accounting": PRICES},
                setup=lambda url: key_setup(url, MASTER_KEY), flag="keys"),
        Variant("kaiyuan+keys-redis", config_patch={"server": {"master_key": MASTER_KEY}, "accounting": PRICES,
                "limits": {"backend": "redis", "redis_url": "redis://127.0.0.1:6379/0"}},
                setup=lambda url: key_setup(url, MASTER_KEY), flag="keys"),
    """
    import json
    import urllib.request

    body = {"name": "bench", "rpm": 10**9, "tpm": 10**12, "budgets": [{"period": "month", "limit_usd": 10**6}]}
    req = urllib.request.Request(
        base_url.rstrip("/") + "/admin/keys", data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {master_key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        key = json.loads(resp.read())["key"]
    return {"Authorization": f"Bearer {key}"}


async def measure(gw: Gateway, key: str, n: int, concurrency: int = 1, gap_s: float = 0.0) -> list[float]:
    headers = {"Authorization": f"Bearer {key}"}
    out: list[float] = []

    async def worker(w: int) -> None:
        for i in range(w, n + 200, concurrency):
            ctx = RequestContext(f"r{i}", "openai", "chat", headers=headers, body=BODY, raw_body=RAW_BODY, model="bench")
            t0 = time.perf_counter()
            rec = await gw.auth.authenticate(ctx)
            if rec is not None:
                await gw.reservations.reserve(ctx, rec)
            ctx.deployment = "bench-dep"
            ctx.status = 200
            ctx.usage = Usage(12, 10)
            await settle(gw, ctx)
            if i >= 200:  # warm-up: key cache, tokenizer, script load
                out.append((time.perf_counter() - t0) * 1e6)
            if gap_s:
                await asyncio.sleep(gap_s)  # the client's turn-around, outside the timed window

    await worker(0) if concurrency == 1 else await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return out


async def run_variant(name: str, limits: dict[str, Any], n: int, concurrency: int = 1, gap_s: float = 0.0) -> dict[str, Any]:
    db = tempfile.mkdtemp() + "/bench.db"
    cfg = parse_config({
        "server": {"master_key": MASTER},
        "store": {"url": f"sqlite:///{db}"},
        "limits": limits,
        "accounting": {"spend_flush_interval_s": 3600},
        "models": [{"name": "bench", "deployments": [{"id": "bench-dep", "provider": "openai_compatible",
                    "base_url": "http://127.0.0.1:9/v1", "model": "gpt-4o-mini"}]}],
    }, "<bench>")
    engine = open_store(cfg.store.url)
    gw = Gateway(cfg, engine)
    key = MASTER
    if name != "master-key":
        k = keystore.create_key(engine, {"name": "bench", "rpm": 10**9, "tpm": 10**12}, [{"period": "month", "limit_usd": 10**6}])
        key = k["key"]
    t0 = time.perf_counter()
    samples = await measure(gw, key, n, concurrency, gap_s)
    wall = time.perf_counter() - t0
    batcher = getattr(gw.reservations.counters, "batcher", None)
    await gw.close()
    samples.sort()
    return {"variant": name, "n": len(samples), "median_us": statistics.median(samples),
            "p99_us": samples[int(len(samples) * 0.99)], "rps": (n + 200) / wall,
            "batches": f"{batcher.batches}/{batcher.applied}" if batcher is not None else "-"}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis")
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("-c", type=int, default=1, help="requests at a time")
    ap.add_argument("--gap-ms", type=float, default=0.0, help="pause between a worker's requests (not timed)")
    a = ap.parse_args()
    variants: list[tuple[str, dict[str, Any]]] = [("master-key", {}), ("key+limits+budget (memory)", {"backend": "memory"})]
    if a.redis:
        variants.append(("key+limits+budget (redis)", {"backend": "redis", "redis_url": a.redis}))
    print(f"{'variant':32} {'n':>7} {'median µs':>10} {'p99 µs':>10} {'req/s':>8} {'batches/settles':>16}")
    for name, limits in variants:
        r = await run_variant(name, limits, a.n, a.c, a.gap_ms / 1000)
        print(f"{r['variant']:32} {r['n']:>7} {r['median_us']:>10.1f} {r['p99_us']:>10.1f} {r['rps']:>8.0f} {r['batches']:>16}")


if __name__ == "__main__":
    asyncio.run(main())
