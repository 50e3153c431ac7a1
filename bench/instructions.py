"""Instructions per request, counted by Valgrind: a cost figure that a busy machine cannot blur.

    python bench/instructions.py                    # Kaiyuan and the aiohttp floor, non-streaming
    python bench/instructions.py --stream --with keys --requests 2000
    python bench/instructions.py --scenario anthropic-stream --no-floor   # a translated stream
    python bench/instructions.py --with keys --with keys-redis --no-floor   # redis-server runs natively

Wall-clock and CPU-time figures move by tens of percent when other jobs share the two cores; a
count of the instructions the gateway process executes per request does not. Each target (Kaiyuan,
a bench/scenarios.py variant, or the bare aiohttp floor) runs under ``valgrind --tool=callgrind``
with instrumentation off; after a warm-up it is switched on for ``--requests`` requests at
``--concurrency``, then dumped. The result is user-space instructions only (the kernel's share of a
syscall is not counted) for the whole process, every thread included (Valgrind runs one thread at
a time). Valgrind slows the process about 50x, so keep the counts small; the ratio to the floor is
the figure to compare across commits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.run import (  # noqa: E402
    PY,
    Fleet,
    Target,
    free_port,
    run_loadgen,
    start_kaiyuan,
    start_redis,
    start_upstream,
    wait_ready,
)
from bench.scenarios import CHAT, CHAT_STREAM, SCENARIOS, VARIANTS, Scenario, Variant, deep_merge  # noqa: E402

FLOOR = ROOT / "bench" / "floors" / "aiohttp_floor.py"
# children traced too: a supervisor's worker (the kaiyuan-sup variant) is counted on its own
VALGRIND = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-instr=no", "--trace-children=yes"]


def wrapped(fleet: Fleet, out: Path) -> None:
    """Make every process ``fleet`` starts from now on run under callgrind (``fleet.start`` pins
    and starts; the command is prefixed here)."""
    start = fleet.start

    def start_under_valgrind(name: str, cmd: list[str], cpus: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        return start(name, [*VALGRIND, f"--callgrind-out-file={out}.%p", *cmd], cpus, env)

    fleet.start = start_under_valgrind  # type: ignore[method-assign]


def time_scaled(variant: Variant | None, scale: float) -> Variant | None:
    """``variant`` (None: the plain gateway) with its periodic work spaced ``scale`` times wider.

    Valgrind runs the gateway ~50x slower, but its timers keep wall-clock time: a key cache that
    expires every 5 s is reloaded (three SQLAlchemy queries in a thread, and the collections their
    allocations set off) every ~200 requests instead of every ~15,000, and the ledger and the request
    log are written every ~40 rows instead of every ~3,000. Per request, that periodic work counts
    ~50x what it costs at full speed (the console's rollup, which re-reads the current hour of the
    log every 30 s, too). With ``scale`` near the slowdown, it counts what it costs."""
    if scale == 1:
        return variant
    from kaiyuan.config import AccountingSettings, ConsoleSettings, LimitsSettings, RequestLogSettings

    patch = {
        "limits": {"key_cache_ttl_s": LimitsSettings().key_cache_ttl_s * scale},
        "accounting": {"spend_flush_interval_s": AccountingSettings().spend_flush_interval_s * scale},
        "request_log": {"flush_interval_s": RequestLogSettings().flush_interval_s * scale},
        "console": {"rollup_interval_s": ConsoleSettings().rollup_interval_s * scale},
    }
    if variant is None:
        return Variant("kaiyuan", config_patch=patch)
    return dataclasses.replace(variant, config_patch=deep_merge(patch, variant.config_patch))


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120)


def drive(fleet: Fleet, target: Target, sc: Scenario, requests: int, concurrency: int) -> int:
    """Send ``requests`` requests (rounded down to a multiple of ``concurrency``), return how many
    succeeded."""
    spec = {"host": "127.0.0.1", "port": target.port, "path": sc.path, "body": json.dumps(sc.body_for(target.name)),
            "stream": sc.stream, "concurrency": concurrency, "per_conn": max(1, requests // concurrency), "warmup": 0,
            "headers": {**sc.headers, **target.headers}, "expect_chunks": sc.expect_chunks,
            "done_marker": sc.done_marker, "timeout": 120.0}
    raw = run_loadgen(fleet, spec, 1, "0")
    return int(raw.get("ok", 0))


def measure(fleet: Fleet, target: Target, sc: Scenario, out: Path, a: argparse.Namespace) -> list[tuple[str, float]]:
    """Instructions per request of the target's process and, when it has any, of each of its child
    processes (a supervisor's worker): [(role, instructions per request)], the target's own first."""
    import psutil

    drive(fleet, target, sc, a.warmup, a.concurrency)
    root = target.proc.popen.pid
    pids = [root, *(c.pid for c in psutil.Process(root).children(recursive=True))]
    for pid in pids:
        control(pid, "--instr=on")
        control(pid, "--zero")
    ok = drive(fleet, target, sc, a.requests, a.concurrency)
    for pid in pids:
        control(pid, "--dump")
        control(pid, "--instr=off")
    time.sleep(0.5)
    expected = a.requests // a.concurrency * a.concurrency
    if ok < expected:
        print(f"  warning: {target.name}: {expected - ok} requests failed", file=sys.stderr)
    parts = []
    for pid in pids:
        total = 0
        for f in out.parent.glob(f"{out.name}.{pid}*"):
            m = re.search(rb"^(?:summary|totals): (\d+)", f.read_bytes(), re.M)
            if a.verbose:
                print(f"  {f.name}: {m.group(1).decode() if m else '?'}", file=sys.stderr)
            if m:
                total += int(m.group(1))
            if a.keep:
                a.keep.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, a.keep / f"{target.name.replace('+', '_')}.{f.name}")
        role = "process" if len(pids) == 1 else ("supervisor" if pid == root else "worker")
        parts.append((role, total / max(ok, 1)))
    return parts


def start_floor(fleet: Fleet, up: Target, script: Path = FLOOR, name: str = "floor-aiohttp") -> Target:
    port = free_port()
    proc = fleet.start(name, [PY, str(script), "--port", str(port), "--upstream", f"http://127.0.0.1:{up.port}"], "1",
                       {"PYTHONPATH": str(ROOT)})  # the floors import bench.floors.common
    wait_ready(proc, f"http://127.0.0.1:{port}/readyz", 300)
    return Target(name, port, proc, family="floor")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stream", action="store_true")
    p.add_argument("--scenario", choices=[s.name for s in SCENARIOS],
                   help="a bench/scenarios.py scenario instead (e.g. anthropic-stream: a translated stream)")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("-c", "--concurrency", type=int, default=8)
    p.add_argument("--with", dest="variants", action="append", default=[], help="a bench/scenarios.py variant flag")
    p.add_argument("--no-floor", action="store_true")
    p.add_argument("--no-plain", action="store_true", help="leave out the plain kaiyuan target (measure only --with variants)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="space the gateway's periodic work (key cache TTL, ledger and request-log flushes) this "
                        "many times wider, to match Valgrind's slowdown (~50); 1 = the defaults")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--keep", type=Path, help="copy the callgrind dumps here (for callgrind_annotate --inclusive=yes)")
    p.add_argument("--also", type=Path, action="append", default=[],
                   help="another pass-through script with the floor's command line (an experiment)")
    a = p.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="kaiyuan-instr-"))
    fleet = Fleet(workdir, pin=True)
    sc = CHAT_STREAM if a.stream else CHAT
    if a.scenario:
        sc = next(s for s in SCENARIOS if s.name == a.scenario)
    results: list[tuple[str, float]] = []
    try:
        up = start_upstream(fleet, "0")
        targets: list[tuple[str, object]] = [] if a.no_plain else [("kaiyuan", None)]
        targets += [(v.name, v) for v in VARIANTS if v.flag in a.variants]
        # redis-server (the keys-redis variant) runs natively on the load generators' CPU: only
        # the gateway's own instructions are counted, its round trips included
        redis_url = start_redis(fleet, "0") if any(getattr(v, "redis", False) for _n, v in targets) else None
        wrapped(fleet, workdir / "callgrind.out")
        if not a.no_floor:
            targets.append(("floor-aiohttp", "floor"))
        targets += [(script.stem, script) for script in a.also]
        for name, variant in targets:
            if variant == "floor":
                t = start_floor(fleet, up)
            elif isinstance(variant, Path):
                t = start_floor(fleet, up, variant, name)
            else:
                t = start_kaiyuan(fleet, up, "1", time_scaled(variant, a.time_scale), workdir, redis_url)  # type: ignore[arg-type]
            parts = measure(fleet, t, sc, workdir / "callgrind.out", a)
            if len(parts) > 1:
                results += [(f"{name} ({role})", ir) for role, ir in parts]
            results.append((f"{name} (all processes)" if len(parts) > 1 else name, sum(ir for _, ir in parts)))
            print(f"  {name}: {results[-1][1]:,.0f}", file=sys.stderr)
            fleet.stop(t.proc)
        floor = dict(results).get("floor-aiohttp")
        scaled = f", periodic work spaced x{a.time_scale:g}" if a.time_scale != 1 else ""
        print(f"# Instructions per request: {sc.name}, c={a.concurrency}, {a.requests} requests after {a.warmup} warm-up{scaled}\n")
        print("| target | instructions / request | x floor |\n|---|---:|---:|")
        for name, ir in results:
            ratio = f"{ir / floor:.2f}x" if floor else "-"
            print(f"| {name} | {ir:,.0f} | {ratio} |")
        return 0
    finally:
        fleet.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
