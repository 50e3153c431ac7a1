"""System calls, context switches and CPU per request, per process: the kernel's share of a request.

    python bench/syscalls.py --with sup --with keys-sup -c 64 --requests 4000
    python bench/syscalls.py --with keys-sup --no-plain --strace   # strace -c -f on each process too

Valgrind (bench/instructions.py) counts user-space instructions only; a request that talks to
another process (the supervisor's shared counters, Redis) also pays for its system calls and for
the wake-ups they cause. This counts them from /proc for the target's process and each of its
children (a supervisor's worker) over ``--requests`` requests after a warm-up: read- and
write-family system calls (``/proc/PID/io`` syscr/syscw: read, write, readv, writev and the like;
not recv/send, which uvloop does not use on streams), voluntary and involuntary context switches
(every thread), and user/system CPU time (``/proc/PID/stat``, noisy on a shared machine). With
``--strace`` each process is traced (``strace -c -f``) during a second run of the same size, and
every system call is counted by name (strace slows the process; the counts are what matter).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.instructions import drive, time_scaled  # noqa: E402
from bench.run import Fleet, start_kaiyuan, start_upstream  # noqa: E402
from bench.scenarios import CHAT, CHAT_STREAM, VARIANTS, Variant  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
FIELDS = ("syscr", "syscw", "vcsw", "ivcsw", "utime_us", "stime_us")


def sample(pid: int) -> dict[str, float]:
    """The process's counters now (every thread summed)."""
    out = dict.fromkeys(FIELDS, 0.0)
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("syscr", "syscw"):
            out[k] = float(v)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        out["vcsw"] += float(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
        out["ivcsw"] += float(re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    out["utime_us"] = int(stat[11]) * 1e6 / TICK
    out["stime_us"] = int(stat[12]) * 1e6 / TICK
    return out


def processes(root: int) -> list[tuple[str, int]]:
    import psutil

    kids = [c.pid for c in psutil.Process(root).children(recursive=True)]
    if not kids:
        return [("process", root)]
    return [("supervisor", root), *(("worker", k) for k in kids)]


def strace_counts(pids: list[tuple[str, int]], run: Callable[[], object], workdir: Path) -> dict[str, dict[str, int]]:
    """Calls by name per process while ``run()`` runs, from ``strace -c -f -p``."""
    traces = []
    for role, pid in pids:
        out = workdir / f"strace.{pid}"
        p = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(pid)], stderr=subprocess.DEVNULL)
        traces.append((role, p, out))
    time.sleep(1.0)  # strace attaches to every thread
    run()
    counts: dict[str, dict[str, int]] = {}
    for role, p, out in traces:
        p.send_signal(signal.SIGINT)
        p.wait(30)
        calls: dict[str, int] = {}
        for line in out.read_text().splitlines():
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
            if m and m.group(2) != "total":
                calls[m.group(2)] = int(m.group(1))
        counts[role] = calls
    return counts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stream", action="store_true")
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("--with", dest="variants", action="append", default=[], help="a bench/scenarios.py variant flag")
    p.add_argument("--no-plain", action="store_true", help="leave out the plain kaiyuan target")
    p.add_argument("--strace", action="store_true", help="also count every system call by name (strace -c -f)")
    a = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="kaiyuan-syscalls-"))
    fleet = Fleet(workdir, pin=True)
    sc = CHAT_STREAM if a.stream else CHAT
    try:
        up = start_upstream(fleet, "0")
        targets: list[Variant | None] = [] if a.no_plain else [None]
        targets += [v for v in VARIANTS if v.flag in a.variants]
        print(f"# Per request: {sc.name}, c={a.concurrency}, {a.requests} requests after {a.warmup} warm-up\n")
        print("| target | process | reads | writes | voluntary cs | involuntary cs | user µs | system µs |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        traced: list[tuple[str, dict[str, dict[str, int]], int]] = []
        for variant in targets:
            t = start_kaiyuan(fleet, up, "1", time_scaled(variant, 1), workdir)
            drive(fleet, t, sc, a.warmup, a.concurrency)
            pids = processes(t.proc.popen.pid)
            before = {pid: sample(pid) for _r, pid in pids}
            ok = drive(fleet, t, sc, a.requests, a.concurrency)
            after = {pid: sample(pid) for _r, pid in pids}
            for role, pid in pids:
                d = [(after[pid][f] - before[pid][f]) / max(ok, 1) for f in FIELDS]
                print(f"| {t.name} | {role} | {d[0]:.2f} | {d[1]:.2f} | {d[2]:.2f} | {d[3]:.2f} | {d[4]:.0f} | {d[5]:.0f} |")
            if a.strace and shutil.which("strace"):
                done: list[int] = []
                run = partial(lambda t, done: done.append(drive(fleet, t, sc, a.requests, a.concurrency)), t, done)
                traced.append((t.name, strace_counts(pids, run, workdir), done[0]))
            fleet.stop(t.proc)
        for name, counts, ok in traced:
            print(f"\n## strace -c -f, {name}: calls per request ({ok} requests)\n")
            for role, calls in counts.items():
                top = sorted(calls.items(), key=lambda kv: -kv[1])[:8]
                total = sum(calls.values())
                print(f"- {role}: {total / max(ok, 1):.2f} in all; "
                      + ", ".join(f"{k} {v / max(ok, 1):.2f}" for k, v in top))
        return 0
    finally:
        fleet.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
