"""The memory soak (issue 13): does Kaiyuan's RSS stay flat under a steady load for ten minutes?

    python bench/soak.py                      # 1 min warm-up + 10 min measured, 500 req/s
    python bench/soak.py --with keys --minutes 5
    python bench/soak.py --minutes 0.05 --warmup-minutes 0.02 --rate 50 --interval 0.5   # smoke

A leak that costs a few hundred bytes per request hides in a 5-second benchmark cell and takes a
server down after a week, so this runs long, at a fixed rate (open loop: requests are sent on a
clock, not when the previous one returns, so a slowing gateway does not slow the load), and looks
only at memory. It starts bench/fast_upstream.py and Kaiyuan exactly as bench/run.py does (its
helpers, the same pinning: upstream and this driver on CPU 0, the gateway on CPU 1), sends a fixed
mix of non-streaming and streaming chat, samples the RSS of every process in the gateway's process
group every ``--interval`` seconds, and reports the start/end/max RSS of the measured window (after
the warm-up), the least-squares slope, and the request-log (and spend-ledger) rows written against
the requests answered. Samples go to ``samples.csv`` and the summary to ``report.json`` in ``--out``.

In-flight requests are capped (``--max-inflight``); a tick that finds the cap reached skips its
request and counts it, so the driver's own memory stays bounded and the shortfall is visible.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import smaps, stall  # noqa: E402
from bench.loadgen import TOKEN_RE, read_rest  # noqa: E402
from bench.run import Fleet, Target, start_kaiyuan, start_redis, start_upstream  # noqa: E402
from bench.scenarios import CHAT, CHAT_STREAM, STREAM_CHUNKS, VARIANTS, Variant, deep_merge  # noqa: E402
from kaiyuan.observability import memtrace  # noqa: E402

# 1 MiB per 10 minutes: at 500 req/s that is 300,000 requests, about 3.5 bytes each. Anything a
# request leaves behind (a dict entry, a task, a queued row: 50 bytes and up) would show as 15 MiB
# or more, while a bounded cache that fills during the warm-up shows as a step, then flat.
FLAT_MIB_PER_10MIN = 1.0


@dataclass
class Counters:
    sent: int = 0
    answered: int = 0  # any HTTP status
    ok: int = 0  # 200 with a complete body
    errors: int = 0
    skipped: int = 0  # not sent: the in-flight cap was reached
    connects: int = 0  # connections opened (the gateway closes idle ones after server.header_timeout_s)
    # requests sent again on a new connection: the reused idle one was closed (the gateway's
    # keep-alive timeout racing the request) before any byte of an answer came back; not errors
    retried_idle: int = 0
    streams: int = 0
    streams_with_loss: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)

    def error(self, msg: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(msg[:300])


@dataclass
class Sample:
    t_s: float
    phase: str  # "warmup" or "measure"
    rss_mib: float
    leader_mib: float  # the supervisor with --with sup, else the one process
    others_mib: float  # the supervisor's workers (0 for one process)
    procs: int
    sent: int
    answered: int
    errors: int
    inflight: int  # requests in flight at the sample: a stall elsewhere shows as a peak here
    skipped: int


def request_bytes(port: int, body: dict[str, Any], headers: dict[str, str]) -> bytes:
    data = json.dumps(body).encode()
    lines = [f"POST {CHAT.path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json",
             f"Content-Length: {len(data)}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Driver:
    """Open-loop load: request ``i`` is due at ``i / rate`` seconds; every ``1/stream_share``-th is a stream."""

    def __init__(self, port: int, headers: dict[str, str], rate: float, stream_share: float,
                 max_inflight: int, timeout: float, close: bool = False) -> None:
        self.port, self.rate, self.share = port, rate, stream_share
        self.max_inflight, self.timeout = max_inflight, timeout
        if close:  # a connection per request, like a client without keep-alive
            headers = {**headers, "Connection": "close"}
        self.plain = request_bytes(port, CHAT.body, headers)
        self.stream = request_bytes(port, CHAT_STREAM.body, headers)
        self.idle: list[Conn] = []  # at most max_inflight: a connection is idle or carries one request
        self.tasks: set[asyncio.Task[None]] = set()
        self.c = Counters()

    def is_stream(self, i: int) -> bool:
        return int((i + 1) * self.share) > int(i * self.share)

    async def run(self, seconds: float) -> None:
        """Send at the rate for ``seconds``; a second call starts a fresh clock (after a pause)."""
        start = time.perf_counter()
        i = 0
        while (now := time.perf_counter()) - start < seconds:
            due = int((now - start) * self.rate)
            while i < due:
                if len(self.tasks) >= self.max_inflight:
                    self.c.skipped += 1
                else:
                    task = asyncio.create_task(self.one(self.is_stream(i)))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
                i += 1
            await asyncio.sleep(max(0.0, start + (i + 1) / self.rate - time.perf_counter()))

    async def drain(self) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=self.timeout + 5)
        for _, w in self.idle:
            w.close()
        self.idle.clear()

    def take_idle(self) -> Conn | None:
        """The most recently used idle connection the gateway has not closed (its keep-alive timeout)."""
        while self.idle:
            conn = self.idle.pop()
            if not conn[0].at_eof():
                return conn
            conn[1].close()
        return None

    async def one(self, stream: bool) -> None:
        self.c.sent += 1
        conn = self.take_idle()
        try:
            if conn is None:
                conn = await self.connect()
                head = await self.send(conn, stream)
            else:
                head, conn = await self.resend_if_unanswered(conn, stream)
            status, body, _, close = await asyncio.wait_for(
                read_rest(conn[0], head, time.perf_counter(), stream), self.timeout)
        except FAILURES as e:
            self.c.error(f"{type(e).__name__}: {e}")
            if conn is not None:
                conn[1].close()
            return
        self.c.answered += 1
        self.c.status_counts[str(status)] = self.c.status_counts.get(str(status), 0) + 1
        if close:
            conn[1].close()
        else:
            self.idle.append(conn)
        if status != 200:
            self.c.error(f"HTTP {status}: {body[:200]!r}")
            return
        if stream:
            self.c.streams += 1
            got = len({int(m) for m in TOKEN_RE.findall(body)} & set(range(STREAM_CHUNKS)))
            if got < STREAM_CHUNKS or b"[DONE]" not in body:
                self.c.streams_with_loss += 1
                self.c.error(f"stream lost chunks: {got}/{STREAM_CHUNKS} content tokens")
                return
        self.c.ok += 1

    async def connect(self) -> Conn:
        self.c.connects += 1
        return await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 20)

    async def send(self, conn: Conn, stream: bool) -> bytes:
        """Send one request on ``conn``; its response's head."""
        conn[1].write(self.stream if stream else self.plain)
        return await asyncio.wait_for(conn[0].readuntil(b"\r\n\r\n"), self.timeout)

    async def resend_if_unanswered(self, conn: Conn, stream: bool) -> tuple[bytes, Conn]:
        """Send on a reused idle connection; if the gateway closed it before any byte of an answer
        came back (its keep-alive timeout raced the request), send once more on a new connection,
        as HTTP clients do, and count it in ``retried_idle``, not as an error."""
        try:
            return await self.send(conn, stream), conn
        except FAILURES as e:
            if not unanswered(e):
                raise
        conn[1].close()
        self.c.retried_idle += 1
        fresh = await self.connect()
        try:
            return await self.send(fresh, stream), fresh
        except BaseException:
            fresh[1].close()
            raise


FAILURES = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError)


def unanswered(e: BaseException) -> bool:
    """The connection ended (closed, or reset) before a single byte of the response came back."""
    if isinstance(e, asyncio.IncompleteReadError):
        return not e.partial
    return isinstance(e, (ConnectionResetError, BrokenPipeError))


def group_rss(pgid: int) -> tuple[float, float, int]:
    """VmRSS (MiB) of process group ``pgid``: its leader (a supervisor, or the one process), the
    sum of the others (a supervisor's workers), and how many processes there are."""
    pids = group_pids(pgid)
    kib = [_rss_kib(p) for p in pids]
    return kib[0] / 1024 if kib else 0.0, sum(kib[1:]) / 1024, len(pids)


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(b"VmRSS:")), 0)
    except OSError:
        return 0


def group_pids(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``, its leader first."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                if int(f.read().rsplit(b")", 1)[1].split()[2]) == pgid:
                    pids.append(int(d))
        except (OSError, IndexError, ValueError):
            continue
    return sorted(pids, key=lambda p: p != pgid)


class SampleLog:
    """Samples in memory (for the summary) and in ``samples.csv``, flushed per row: a run that dies
    still leaves its data. One row per ``--interval``: 120 rows per 10 minutes at the default.
    With ``smaps_path`` (``--smaps``) also each process's memory by kind (bench/smaps.py)."""

    def __init__(self, path: Path, smaps_path: Path | None = None) -> None:
        self.rows: list[Sample] = []
        self.fh = open(path, "w", newline="")
        self.csv = csv.writer(self.fh)
        self.csv.writerow(list(Sample.__dataclass_fields__))
        self.smaps_fh = open(smaps_path, "w", newline="") if smaps_path else None
        self.smaps_csv = csv.writer(self.smaps_fh) if self.smaps_fh else None
        if self.smaps_csv:
            self.smaps_csv.writerow(["t_s", "phase", "pid", "role", *(f"{k}_kib" for k in smaps.KINDS)])
        self.kinds: dict[str, list[dict[str, int]]] = {}  # role -> [first, last] of the measured window

    def add(self, s: Sample) -> None:
        self.rows.append(s)
        self.csv.writerow(list(asdict(s).values()))
        self.fh.flush()

    def add_smaps(self, t: float, phase: str, pgid: int) -> None:
        if self.smaps_csv is None or self.smaps_fh is None:
            return
        pids = group_pids(pgid)
        total: dict[str, dict[str, int]] = {}
        for pid in pids:
            kib = smaps.breakdown(pid)
            if kib is None:
                continue
            role = "process" if len(pids) == 1 else ("supervisor" if pid == pgid else "workers")
            self.smaps_csv.writerow([t, phase, pid, role, *kib.values()])
            acc = total.setdefault(role, dict.fromkeys(smaps.KINDS, 0))
            for k, v in kib.items():
                acc[k] += v
        self.smaps_fh.flush()
        if phase == "measure":
            for role, kib in total.items():
                seen = self.kinds.setdefault(role, [kib, kib])
                seen[1] = kib

    def close(self) -> None:
        self.fh.close()
        if self.smaps_fh:
            self.smaps_fh.close()


async def sample_loop(pgid: int, drv: Driver, interval: float, warmup_s: float, log: SampleLog) -> None:
    start = time.perf_counter()
    while True:
        t = time.perf_counter() - start
        leader, others, n = group_rss(pgid)
        phase = "warmup" if t < warmup_s else "measure"
        log.add(Sample(round(t, 2), phase, round(leader + others, 3), round(leader, 3), round(others, 3), n,
                       drv.c.sent, drv.c.answered, drv.c.errors, len(drv.tasks), drv.c.skipped))
        log.add_smaps(round(t, 2), phase, pgid)
        await asyncio.sleep(max(0.0, interval - (time.perf_counter() - start - t)))


def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) points, in MiB per minute."""
    if len(points) < 2:
        return None
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return 60 * sum((x - mx) * (y - my) for x, y in points) / sxx


def count_rows(db: Path | None, table: str) -> int | None:
    if db is None or not db.exists():
        return None
    try:
        with sqlite3.connect(db) as conn:
            return int(conn.execute(f"select count(*) from {table}").fetchone()[0])
    except sqlite3.Error:
        return None


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def summarize(samples: list[Sample], c: Counters, args: argparse.Namespace, rows: dict[str, int | None]) -> dict[str, Any]:
    measured = [s for s in samples if s.phase == "measure"]
    pts = [(s.t_s, s.rss_mib) for s in measured]
    slope = slope_per_min(pts)
    per10 = None if slope is None else slope * 10
    verdict = "unknown (fewer than 2 samples)" if per10 is None else ("flat" if per10 < args.flat_mib_per_10min else "GROWING")
    seconds = (measured[-1].t_s - measured[0].t_s) if len(measured) > 1 else 0.0
    sent_in = (measured[-1].sent - measured[0].sent) if len(measured) > 1 else 0
    return {
        "variant": (args.variant or "kaiyuan") + (" (a connection per request)" if args.close else "")
        + (f" patched {json.dumps(args.patch)}" if args.patch else ""),
        "rate_target": args.rate, "stream_share": args.stream_share,
        "warmup_min": args.warmup_minutes, "measured_min": round(seconds / 60, 3), "samples": len(measured),
        "rss_start_mib": measured[0].rss_mib if measured else None,
        "rss_end_mib": measured[-1].rss_mib if measured else None,
        "rss_max_mib": max((s.rss_mib for s in measured), default=None),
        "rss_min_mib": min((s.rss_mib for s in measured), default=None),
        "slope_mib_per_min": _round(slope),
        "growth_mib_per_10min": None if per10 is None else round(per10, 3),
        # Warm-up steps (caches filling, allocator high-water marks) flatten out; a leak does not.
        "slope_second_half_mib_per_min": _round(slope_per_min(pts[len(pts) // 2:])),
        "bytes_per_request": None if slope is None or not sent_in else round(slope / 60 * seconds * 2**20 / sent_in, 2),
        "threshold_mib_per_10min": args.flat_mib_per_10min, "verdict": verdict,
        "rate_achieved": round(sent_in / seconds, 1) if seconds else None,
        "per_process": per_process(measured) if any(s.others_mib for s in measured) else None,
        "counters": asdict(c),
        "rows": rows,
        "rows_lost": {k: (c.answered - v if v is not None else None) for k, v in rows.items()},
    }


def per_process(measured: list[Sample]) -> dict[str, dict[str, float | None]]:
    """With a supervisor: where the growth is, the supervisor or its workers."""
    out = {}
    for name, pick in (("supervisor", lambda s: s.leader_mib), ("workers", lambda s: s.others_mib)):
        pts = [(s.t_s, pick(s)) for s in measured]
        slope = slope_per_min(pts)
        out[name] = {"start_mib": pts[0][1], "end_mib": pts[-1][1], "max_mib": max(p[1] for p in pts),
                     "growth_mib_per_10min": None if slope is None else round(slope * 10, 3),
                     "slope_second_half_mib_per_min": _round(slope_per_min(pts[len(pts) // 2:]))}
    return out


def render(r: dict[str, Any]) -> str:
    c = r["counters"]
    lines = [
        f"soak: {r['variant']}, target {r['rate_target']} req/s ({r['stream_share']:.0%} streams), "
        f"warm-up {r['warmup_min']} min, measured {r['measured_min']} min ({r['samples']} samples)",
        f"RSS (MiB): start {r['rss_start_mib']}, end {r['rss_end_mib']}, min {r['rss_min_mib']}, max {r['rss_max_mib']}",
        f"slope: {r['slope_mib_per_min']} MiB/min = {r['growth_mib_per_10min']} MiB per 10 min "
        f"({r['bytes_per_request']} bytes per request); second half of the window: "
        f"{r['slope_second_half_mib_per_min']} MiB/min",
        f"requests: sent {c['sent']}, answered {c['answered']}, ok {c['ok']}, errors {c['errors']}, "
        f"skipped at the in-flight cap {c['skipped']}, connections opened {c['connects']} "
        f"(requests re-sent after an idle connection closed under them: {c.get('retried_idle', 0)}), streams {c['streams']} (with loss {c['streams_with_loss']}); "
        f"achieved {r['rate_achieved']} req/s in the measured window",
        f"status codes: {c['status_counts']}",
    ]
    for name, p in (r["per_process"] or {}).items():
        lines.append(f"  {name}: {p['start_mib']} -> {p['end_mib']} MiB (max {p['max_mib']}), "
                     f"{p['growth_mib_per_10min']} MiB per 10 min, second half {p['slope_second_half_mib_per_min']} MiB/min")
    for role, kinds in (r.get("smaps_kib") or {}).items():
        lines.append(f"  {role} resident KiB by kind (start -> end): " + ", ".join(f"{k} {v}" for k, v in kinds.items()))
    lines += [f"rows in {k}: {v} (answered - rows = {r['rows_lost'][k]})" for k, v in r["rows"].items()]
    lines += [f"error sample: {e}" for e in c["error_samples"]]
    if st := r.get("stalls"):
        lines.append(f"injected stalls: {st['count']}; serving process's step per stall (MiB): {st['steps_mib']}; "
                     f"later stalls together {st['later_steps_sum_mib']}, between stalls {st['between_stalls_sum_mib']}; "
                     f"in flight at each resume {st['inflight_at_resume']}")
    lines.append(f"verdict: {r['verdict']} (threshold < {r['threshold_mib_per_10min']} MiB per 10 min after warm-up)")
    return "\n".join(lines)


def pick_variant(flag: str | None) -> Variant | None:
    if flag is None:
        return None
    for v in VARIANTS:
        if v.flag == flag:
            return v
    raise SystemExit(f"unknown --with {flag!r}; one of: {', '.join(str(v.flag) for v in VARIANTS)}")


def serving_pid(pgid: int) -> int:
    """The process that serves requests: a supervisor's (first) worker, else the one process. The
    supervisor has no SIGUSR1 handler (it would die of the signal) and serves nothing."""
    pids = group_pids(pgid)
    return pids[1] if len(pids) > 1 else pgid


def snapshots(heap_dir: Path) -> set[Path]:
    return set(heap_dir.glob("*.tracemalloc")) if heap_dir.exists() else set()


async def heap_snapshot(pid: int, heap_dir: Path | None) -> Path | None:
    """With --tracemalloc: ask the gateway for a heap snapshot (SIGUSR1) and wait until it is written."""
    if heap_dir is None:
        return None
    before = snapshots(heap_dir)
    os.kill(pid, signal.SIGUSR1)
    for _ in range(1200):
        new = snapshots(heap_dir) - before
        if new:
            return new.pop()
        await asyncio.sleep(0.1)
    raise RuntimeError("the gateway wrote no heap snapshot within 120 s of SIGUSR1")


def heap_diff(first: Path, last: Path, top: int = 25) -> str:
    """The source lines whose live allocations grew most between two snapshots."""
    import tracemalloc

    skip = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>")]
    a = tracemalloc.Snapshot.load(str(first)).filter_traces(skip)
    b = tracemalloc.Snapshot.load(str(last)).filter_traces(skip)
    total = sum(s.size for s in b.statistics("filename")) - sum(s.size for s in a.statistics("filename"))
    lines = [f"traced heap grew by {total / 2**20:.3f} MiB between the snapshots; top lines:"]
    lines += [str(d) for d in b.compare_to(a, "lineno")[:top]]
    lines.append("\ntop tracebacks of the largest growth:")
    for d in b.compare_to(a, "traceback")[:5]:
        lines.append(f"{d.size_diff / 1024:+.1f} KiB, {d.count_diff:+d} blocks")
        lines += ["    " + ln for ln in d.traceback.format()]
    return "\n".join(lines)


Heaps = tuple[Path | None, Path | None]


async def drive(target: Target, args: argparse.Namespace, samples: SampleLog, heap_dir: Path | None,
                stalls: list[stall.Stall]) -> tuple[Counters, Heaps]:
    drv = Driver(target.port, target.headers, args.rate, args.stream_share, args.max_inflight, args.timeout, args.close)
    warmup_s = args.warmup_minutes * 60
    sampler = asyncio.create_task(sample_loop(target.proc.pid, drv, args.interval, warmup_s, samples))
    stopper = None
    if args.stall_every:  # --stall-every: stop the serving process on purpose (bench/stall.py)
        stopper = asyncio.create_task(stall.stall_loop(serving_pid(target.proc.pid), args.stall_every, args.stall_for,
                                                       lambda: len(drv.tasks), stalls))
    try:
        await drv.run(warmup_s)
        first = await heap_snapshot(serving_pid(target.proc.pid), heap_dir)
        await drv.run(args.minutes * 60)
        last = await heap_snapshot(serving_pid(target.proc.pid), heap_dir)
        sampler.cancel()  # every sample is taken under the steady load, none while draining
        if stopper:
            stopper.cancel()
            await asyncio.gather(stopper, return_exceptions=True)  # the process is let go (SIGCONT)
        await drv.drain()
    finally:
        sampler.cancel()
        if stopper:
            stopper.cancel()
            await asyncio.gather(stopper, return_exceptions=True)
    return drv.c, (first, last)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Kaiyuan memory soak at a steady open-loop load (issue 13)")
    p.add_argument("--minutes", type=float, default=10.0, help="measured minutes after the warm-up (default 10)")
    p.add_argument("--warmup-minutes", type=float, default=1.0)
    p.add_argument("--rate", type=float, default=500.0, help="requests per second (default 500)")
    p.add_argument("--stream-share", type=float, default=0.3, help="fraction of requests that stream (default 0.3)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between RSS samples (default 5)")
    p.add_argument("--max-inflight", type=int, default=256)
    p.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    p.add_argument("--with", dest="variant", default=None, help="a Kaiyuan variant flag from bench/scenarios.py: keys, keys-redis, ...")
    p.add_argument("--smaps", action="store_true",
                   help="also record each process's memory by kind (heap, thread arenas, other anon, file) in smaps.csv")
    p.add_argument("--patch", type=json.loads, default=None, metavar="JSON",
                   help='deep-merged into the gateway\'s config, e.g. \'{"server": {"malloc_trim_interval_s": 0}}\' for an A/B run')
    p.add_argument("--flat-mib-per-10min", type=float, default=FLAT_MIB_PER_10MIN)
    p.add_argument("--close", action="store_true", help="one connection per request (Connection: close)")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--tracemalloc", action="store_true",
                   help="run the gateway with KAIYUAN_TRACEMALLOC; write heap-diff.txt (end vs warm-up end). Slows it")
    p.add_argument("--stall-every", type=float, default=0.0, metavar="S",
                   help="stop the serving process (SIGSTOP) every S seconds while the load goes on (bench/stall.py); 0: never")
    p.add_argument("--stall-for", type=float, default=1.0, metavar="S", help="how long each --stall-every stop lasts (default 1 s)")
    p.add_argument("--out", default=None, help="directory for samples.csv and report.json (default: a new temp dir)")
    a = p.parse_args(argv)
    if a.rate <= 0 or not 0 <= a.stream_share <= 1 or a.minutes <= 0 or a.warmup_minutes < 0 or a.interval <= 0:
        p.error("--rate, --minutes and --interval must be > 0, --warmup-minutes >= 0, --stream-share in [0, 1]")
    if a.stall_every < 0 or (a.stall_every and not 0 < a.stall_for < a.stall_every):
        p.error("--stall-every must be >= 0, and --stall-for > 0 and shorter than --stall-every")
    return a


def _exit_on_term(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # so `finally` stops the upstream and the gateway


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_term)
    variant = pick_variant(args.variant)
    if args.patch:
        base = variant or Variant("kaiyuan")
        variant = replace(base, config_patch=deep_merge(base.config_patch, args.patch))
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    gen_cpu, gw_cpu = ("0", "1") if pin else ("", "")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="kaiyuan-soak-out-"))
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="kaiyuan-soak-"))
    fleet = Fleet(workdir, pin)
    samples = SampleLog(out / "samples.csv", out / "smaps.csv" if args.smaps else None)
    stalls: list[stall.Stall] = []
    try:
        up = start_upstream(fleet, gen_cpu)
        redis_url = start_redis(fleet, gen_cpu) if variant and variant.redis else None
        heap_dir = workdir / "heap" if args.tracemalloc else None
        if heap_dir:
            os.environ[memtrace.ENV] = str(heap_dir)  # Fleet.start passes os.environ on
        target = start_kaiyuan(fleet, up, gw_cpu, variant, workdir, redis_url)
        os.environ.pop(memtrace.ENV, None)
        if pin:
            os.sched_setaffinity(0, {0})  # this driver shares CPU 0 with the upstream, as run.py's loadgen does
        try:
            import uvloop

            uvloop.install()
        except ImportError:  # pragma: no cover
            pass
        counters, (first, last) = asyncio.run(drive(target, args, samples, heap_dir, stalls))
        if first and last:
            (out / "heap-diff.txt").write_text(heap_diff(first, last))
        time.sleep(2.5)  # the batch writers' flush interval (1 s by default), with margin
        tables = ["request_log"] + (["spend_ledger"] if variant and "accounting" in variant.config_patch else [])
        rows = {t: count_rows(target.db, t) for t in tables}
    except BaseException:
        print(f"soak failed; process logs are in {workdir}", file=sys.stderr)
        raise
    finally:
        fleet.stop_all()
        samples.close()
    report = summarize(samples.rows, counters, args, rows)
    report["smaps_kib"] = {role: {k: f"{a[k]} -> {b[k]}" for k in smaps.KINDS} for role, (a, b) in samples.kinds.items()} or None
    report["stalls"] = stall.summary(stalls) if args.stall_every else None
    report["command"] = " ".join(["python bench/soak.py", *(sys.argv[1:] if argv is None else argv)])
    report["pinning"] = f"upstream + driver on CPU {gen_cpu}, gateway on CPU {gw_cpu}" if pin else "none"
    report["loadavg_end"] = os.getloadavg()
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(render(report))
    print(f"(samples and report in {out})", file=sys.stderr)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
