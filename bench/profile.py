"""Where Kaiyuan's CPU goes on the hot path: a sampling profile under load, summed by component.

    python bench/profile.py                      # non-streaming, c=64, 10 s
    python bench/profile.py --stream --seconds 20
    python bench/profile.py --with keys          # a virtual key with limits and a budget
    python bench/profile.py --with keys-redis    # the same, counters in Redis (redis-server on the load CPU)

It starts the fake upstream and Kaiyuan exactly as bench/run.py does (pinned: gateway alone on one
CPU), drives it with bench/loadgen.py, and records the gateway with py-spy (``pip install py-spy``;
root or ptrace rights needed) in its raw "collapsed stacks" format, all threads and child processes
included (the request-log writer runs in a thread; with ``--with sup`` the worker is the supervisor's
child, and each sample names its process). Each sample is charged to the first component on its stack,
searched from the leaf up: Kaiyuan's own code by module, aiohttp, the store (SQLAlchemy + sqlite3),
prometheus_client, orjson, asyncio/uvloop, idle. The table is what bench/RESULTS.md quotes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.run import Fleet, run_loadgen, start_kaiyuan, start_redis, start_upstream  # noqa: E402
from bench.scenarios import CHAT, CHAT_STREAM, VARIANTS  # noqa: E402

# (component, substrings of a frame "function (file:line)"), first match from the leaf wins
COMPONENTS: list[tuple[str, tuple[str, ...]]] = [
    ("kaiyuan: request log", ("kaiyuan/observability/request_log", "kaiyuan/store/batch")),
    ("kaiyuan: metrics", ("kaiyuan/observability/metrics",)),
    ("kaiyuan: tracing", ("kaiyuan/observability/tracing",)),
    ("kaiyuan: accounting + limits", ("kaiyuan/accounting/", "kaiyuan/limits/")),
    ("kaiyuan: routing", ("kaiyuan/routing/",)),
    ("kaiyuan: providers", ("kaiyuan/providers/",)),
    ("kaiyuan: dialects", ("kaiyuan/dialects/",)),
    ("kaiyuan: server + pipeline", ("kaiyuan/server/", "kaiyuan/pipeline", "kaiyuan/gateway", "kaiyuan/context")),
    ("kaiyuan: other", ("kaiyuan/",)),
    ("store (SQLAlchemy, sqlite3)", ("sqlalchemy/", "sqlite3", "psycopg")),
    ("prometheus_client", ("prometheus_client/",)),
    ("aiohttp", ("aiohttp/", "multidict", "yarl/")),
    ("orjson", ("orjson",)),
    ("asyncio + uvloop", ("asyncio/", "uvloop")),
]


def component(stack: list[str]) -> str:
    for frame in reversed(stack):
        for name, keys in COMPONENTS:
            if any(k in frame for k in keys):
                return name
    return "other (interpreter, threads, stdlib)"


def _pause_frame() -> str:
    """The leaf frame of the batch writer's pause between INSERT statements (``time.sleep``, which
    py-spy samples as if it ran): not CPU, so left out of the shares."""
    src = ROOT / "kaiyuan" / "store" / "fast_insert.py"
    for i, line in enumerate(src.read_text().splitlines(), 1):
        if "time.sleep(PAUSE_S)" in line:
            return f"insert_rows (kaiyuan/store/fast_insert.py:{i})"
    return "\0"


def summarize(raw: str) -> tuple[Counter[str], int]:
    by: Counter[str] = Counter()
    total = 0
    pause = _pause_frame()
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        if frames[-1].endswith(pause):  # sleeping, not working
            continue
        by[component(frames)] += int(n)
        total += int(n)
    return by, total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stream", action="store_true")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--with", dest="variant", help="a bench/scenarios.py variant flag, e.g. keys")
    p.add_argument("--raw", type=Path, help="also keep py-spy's raw collapsed stacks in this file")
    a = p.parse_args()
    if shutil.which("py-spy") is None and not (Path(sys.executable).parent / "py-spy").exists():
        print("py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 1
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    workdir = Path(tempfile.mkdtemp(prefix="kaiyuan-profile-"))
    fleet = Fleet(workdir, pin=True)
    sc = CHAT_STREAM if a.stream else CHAT
    variant = next((v for v in VARIANTS if v.flag == a.variant), None) if a.variant else None
    try:
        up = start_upstream(fleet, "0")
        redis_url = start_redis(fleet, "0") if variant is not None and variant.redis else None
        gw = start_kaiyuan(fleet, up, "1", variant, workdir, redis_url)
        spec = {"host": "127.0.0.1", "port": gw.port, "path": sc.path, "body": json.dumps(sc.body_for(gw.name)),
                "stream": sc.stream, "concurrency": a.concurrency, "duration": a.seconds + 2, "warmup": 1.0,
                "headers": {**sc.headers, **gw.headers}, "expect_chunks": sc.expect_chunks,
                "done_marker": sc.done_marker, "timeout": 30.0}
        out = workdir / "profile.txt"
        rec = subprocess.Popen([spy, "record", "--pid", str(gw.proc.pid),
                                "--format", "raw", "--rate", str(a.rate), "--duration", str(int(a.seconds)),
                                "--threads", "--subprocesses", "--nonblocking", "--output", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        raw = run_loadgen(fleet, spec, 1, "0")
        rec.wait(timeout=a.seconds + 60)
        by, total = summarize(out.read_text())
        if a.raw:
            shutil.copyfile(out, a.raw)
        ok = int(raw.get("ok", 0))
        print(f"# Profile: {sc.name}, c={a.concurrency}, {a.seconds:g} s, variant {variant.name if variant else 'kaiyuan'}"
              f" ({total} samples at {a.rate}/s; {ok} requests answered in the measured window, {raw.get('errors', 0)} errors)\n")
        print("| where | share of samples |\n|---|---:|")
        for name, n in by.most_common():
            print(f"| {name} | {100 * n / max(total, 1):.1f}% |")
        return 0
    finally:
        fleet.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
