"""Benchmark results: per-cell summaries and the Markdown report (tables + target verdicts)."""

from __future__ import annotations

import argparse
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from bench.scenarios import HOLD_CHUNKS, HOLD_INTERVAL_MS, SCENARIOS


def pct(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0-100) of ``xs``, or None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def ms(x: float | None) -> float | None:
    return None if x is None else x * 1000


@dataclass
class Cell:
    scenario: str
    target: str
    concurrency: int
    ok: int
    errors: int
    rps: float
    p50: float | None  # ms, total time
    p99: float | None
    ttfc50: float | None  # ms, first content chunk (streams)
    ttfc99: float | None
    chunks_expected: int
    chunks_lost: int
    streams_with_loss: int
    missing_done: int
    cpu_us_per_req: float | None  # CPU time of the target process group per answered request
    error_samples: list[str]
    workers_cpu_us_per_req: float | None = None  # with a supervisor: its workers' share of cpu_us_per_req

    @classmethod
    def from_raw(cls, scenario: str, target: str, conc: int, raw: dict[str, Any], cpu_s: float) -> Cell:
        lat = raw.get("latency", [])
        ttfc = raw.get("ttfc", [])
        ok = raw.get("ok", 0)
        elapsed = raw.get("elapsed") or 1.0
        done = raw.get("completed_all", 0)
        return cls(
            scenario, target, conc, ok, raw.get("errors", 0), raw.get("in_window", 0) / elapsed,
            ms(pct(lat, 50)), ms(pct(lat, 99)), ms(pct(ttfc, 50)), ms(pct(ttfc, 99)),
            raw.get("chunks_expected", 0), raw.get("chunks_expected", 0) - raw.get("chunks_received", 0),
            raw.get("streams_with_loss", 0), raw.get("missing_done", 0),
            cpu_s / done * 1e6 if done else None, raw.get("error_samples", []),
        )

    def summary(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def progress_line(self) -> str:
        extra = f" ttfc50={f(self.ttfc50)}ms lost={self.chunks_lost}" if self.chunks_expected else ""
        errs = f" errors={self.errors} {self.error_samples[:1]}" if self.errors else ""
        return (f"  {self.scenario:17} c={self.concurrency:<4} {self.target:20} {self.rps:9.0f} req/s  "
                f"p50={f(self.p50)}ms p99={f(self.p99)}ms{extra}{errs}")


@dataclass
class WrkResult:
    scenario: str
    target: str
    concurrency: int
    rps: float | None
    p50: float | None
    p99: float | None
    non2xx: int
    socket_errors: int
    raw: str

    @classmethod
    def parse(cls, scenario: str, target: str, conc: int, out: str) -> WrkResult:
        def dur(label: str) -> float | None:
            m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
            if not m:
                return None
            return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

        rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if rps is None or float(rps.group(1)) == 0:
            dur = lambda label: None  # noqa: E731 - no answers: wrk prints zero latencies
        non = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        return cls(
            scenario, target, conc, float(rps.group(1)) if rps else None, dur("50"), dur("99"),
            int(non.group(1)) if non else 0, sum(int(x) for x in sock.groups()) if sock else 0, out[-1500:],
        )

    def progress_line(self) -> str:
        return (f"  wrk {self.scenario:13} c={self.concurrency:<4} {self.target:20} {f(self.rps, 0)} req/s  "
                f"p50={f(self.p50)}ms p99={f(self.p99)}ms non2xx={self.non2xx} sockerr={self.socket_errors}")


@dataclass
class HoldResult:
    target: str
    streams: int
    ok: int
    errors: int
    chunks_expected: int
    chunks_lost: int
    streams_with_loss: int
    missing_done: int
    peak_upstream_streams: int
    ttfc50: float | None
    ttfc99: float | None
    p50: float | None
    p99: float | None
    elapsed_s: float
    rss_before_mb: float | None
    rss_after_mb: float | None
    error_samples: list[str]

    @classmethod
    def from_raw(cls, target: str, n: int, raw: dict[str, Any], stats: dict[str, Any],
                 rss0: float | None, rss1: float | None) -> HoldResult:
        return cls(
            target, n, raw.get("ok", 0), raw.get("errors", 0), raw.get("chunks_expected", 0),
            raw.get("chunks_expected", 0) - raw.get("chunks_received", 0), raw.get("streams_with_loss", 0),
            raw.get("missing_done", 0), int(stats.get("peak_streams", 0)),
            ms(pct(raw.get("ttfc", []), 50)), ms(pct(raw.get("ttfc", []), 99)),
            ms(pct(raw.get("latency", []), 50)), ms(pct(raw.get("latency", []), 99)),
            raw.get("elapsed", 0.0), rss0, rss1, raw.get("error_samples", []),
        )

    @property
    def held(self) -> bool:
        return (self.ok == self.streams and self.chunks_lost == 0 and self.missing_done == 0
                and self.peak_upstream_streams >= self.streams)

    def progress_line(self) -> str:
        return (f"  hold {self.streams} streams via {self.target:20} ok={self.ok} errors={self.errors} "
                f"lost={self.chunks_lost} peak_upstream={self.peak_upstream_streams} p99={f(self.p99)}ms")


def f(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    if digits and abs(x) >= 100:
        digits = 1 if abs(x) < 1000 else 0
    return f"{x:.{digits}f}"


def _baseline_of(scenario: str) -> str:
    for s in SCENARIOS:
        if s.name == scenario:
            return s.baseline or s.name
    return scenario


def render(info: dict[str, Any], cells: list[Cell], wrks: list[WrkResult], holds: list[HoldResult],
           notes: list[str], args: argparse.Namespace) -> str:
    by = {(c.scenario, c.target, c.concurrency): c for c in cells}
    out: list[str] = []
    w = out.append
    w(f"# Kaiyuan benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    w(f"- Command: `{info['command']}`  (wall time {info.get('wall_s', '?')} s)")
    w(f"- Machine: {info['nproc']} CPUs, {info['cpu_model']}, Linux {info['kernel']}, Python {info['python']}; "
      f"load average at start {fmt_load(info['loadavg_start'])}, at end {fmt_load(info.get('loadavg_end'))}")
    w(f"- Pinning: {info['pinning']}")
    if info.get("portkey"):
        w(f"- Portkey gateway {info['portkey']} (npm, Node, headless; @hono/node-server pinned to 1.13.8 because "
          "1.14+ fails every streaming request with `TypeError: immutable`)")
    if info.get("litellm"):
        w(f"- LiteLLM {info['litellm']} (proxy, 1 worker, its default install, no database)")
    w(f"- Cells: {args.warmup:g} s warm-up + {args.duration:g} s measured, closed loop "
      f"(each connection sends its next request when the previous answer ends), {args.procs} load generator process(es)")
    if info.get("request_log_rows"):
        rows = ", ".join(f"{k}: {v}" for k, v in info["request_log_rows"].items())
        w(f"- Kaiyuan's request log (SQLite) rows written during the run: {rows}")
    w("")
    w("Latencies in ms. `+p50`/`+p99`: the target's percentile minus the direct-to-upstream one at the same "
      "concurrency (the added latency); `x`: the ratio. `CPU us/req`: CPU time of the target's processes per "
      "request (less sensitive to a shared machine than wall-clock numbers).\n")
    for stream in (False, True):
        sel = [c for c in cells if (c.chunks_expected > 0 or _is_stream(c.scenario)) == stream]
        if not sel:
            continue
        w(f"## {'Streaming' if stream else 'Non-streaming'} (bench/loadgen.py)\n")
        if stream:
            w("| scenario | c | target | req/s | TTFC p50 | TTFC p99 | p50 | p99 | +p50 | +p99 | x p50 | x p99 "
              "| CPU us/req | chunks lost | errors |")
            w("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        else:
            w("| scenario | c | target | req/s | p50 | p99 | +p50 | +p99 | x p50 | x p99 | CPU us/req | errors |")
            w("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for c in sel:
            base = by.get((_baseline_of(c.scenario), "direct", c.concurrency))
            d50 = _diff(c.p50, base.p50 if base else None)
            d99 = _diff(c.p99, base.p99 if base else None)
            r50 = _ratio(c.p50, base.p50 if base else None)
            r99 = _ratio(c.p99, base.p99 if base else None)
            if c.target == "direct":
                d50 = d99 = r50 = r99 = None
            row = [c.scenario, str(c.concurrency), c.target, f(c.rps, 0)]
            if stream:
                row += [f(c.ttfc50), f(c.ttfc99)]
            row += [f(c.p50), f(c.p99), f(d50), f(d99), _x(r50), _x(r99), f(c.cpu_us_per_req, 0)]
            if stream:
                row.append(f"{c.chunks_lost}/{c.chunks_expected}")
            row.append(str(c.errors))
            w("| " + " | ".join(row) + " |")
        w("")
    if wrks:
        w("## Raw throughput with wrk (1 thread, on the load generator's CPU)\n")
        w("| scenario | c | target | req/s | p50 | p99 | +p50 | +p99 | non-2xx | socket errors |")
        w("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        wby = {(x.scenario, x.target, x.concurrency): x for x in wrks}
        for x in wrks:
            wbase = wby.get((x.scenario, "direct", x.concurrency))
            d50 = _diff(x.p50, wbase.p50 if wbase else None) if x.target != "direct" else None
            d99 = _diff(x.p99, wbase.p99 if wbase else None) if x.target != "direct" else None
            w(f"| {x.scenario} | {x.concurrency} | {x.target} | {f(x.rps, 0)} | {f(x.p50)} | {f(x.p99)} | "
              f"{f(d50)} | {f(d99)} | {x.non2xx} | {x.socket_errors} |")
        w("")
    if holds:
        w(f"## Holding {holds[0].streams} concurrent streams\n")
        w(f"Each stream: {HOLD_CHUNKS} content chunks, {HOLD_INTERVAL_MS} ms apart "
          f"({HOLD_CHUNKS * HOLD_INTERVAL_MS / 1000:g} s), all opened at once; `peak upstream` is the most "
          "streams the upstream had open at the same moment (held = all of them at once, none lost).\n")
        w("| target | streams ok | errors | chunks lost | streams with loss | no [DONE] | peak upstream | TTFC p50 | "
          "TTFC p99 | total p50 | total p99 | RSS before/after MB | held |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for h in holds:
            w(f"| {h.target} | {h.ok}/{h.streams} | {h.errors} | {h.chunks_lost}/{h.chunks_expected} | "
              f"{h.streams_with_loss} | {h.missing_done} | {h.peak_upstream_streams} | {f(h.ttfc50)} | {f(h.ttfc99)} | "
              f"{f(h.p50)} | {f(h.p99)} | {f(h.rss_before_mb, 0)}/{f(h.rss_after_mb, 0)} | "
              f"{'yes' if h.held else 'NO'} |")
            if h.error_samples:
                w(f"|  | errors: {'; '.join(h.error_samples[:2])} |" + " |" * 11)
        w("")
    floors = floor_table(cells, wrks)
    if floors:
        w("## Against the floors (bare pass-throughs on the same core, bench/floors/)\n")
        w("\n".join(floors))
        w("")
    w("## Targets (issue 2)\n")
    w("\n".join(verdicts(cells, holds)))
    w("\n## Targets (issue 13: one core, every feature on)\n")
    w("\n".join(verdicts_13(cells, wrks)))
    split = [c for c in cells if c.workers_cpu_us_per_req is not None and c.cpu_us_per_req is not None]
    if split:
        w("\n## CPU per request: workers and supervisor\n")
        w("A supervisor's CPU column counts it and its workers; here the two apart.\n")
        w("| scenario | target | c | workers µs/req | supervisor µs/req |\n|---|---|---:|---:|---:|")
        for c in split:
            sup = (c.cpu_us_per_req or 0) - (c.workers_cpu_us_per_req or 0)
            w(f"| {c.scenario} | {c.target} | {c.concurrency} | {c.workers_cpu_us_per_req:.0f} | {sup:.0f} |")
    if notes:
        w("\n## Notes\n")
        w("\n".join(f"- {n}" for n in notes))
    errs = [c for c in cells if c.errors]
    if errs:
        w("\n## Error samples\n")
        for c in errs:
            w(f"- {c.scenario} c={c.concurrency} {c.target}: {c.errors} errors, e.g. {c.error_samples[:2]}")
    return "\n".join(out) + "\n"


def _is_stream(name: str) -> bool:
    return any(s.name == name and s.stream for s in SCENARIOS)


def verdicts(cells: list[Cell], holds: list[HoldResult]) -> list[str]:
    by = {(c.scenario, c.target, c.concurrency): c for c in cells}
    lines = []
    for sc in ("chat", "chat-stream"):
        k, d = by.get((sc, "kaiyuan", 1)), by.get((sc, "direct", 1))
        if k and d and k.p50 is not None and d.p50 is not None and k.p99 is not None and d.p99 is not None:
            a50, a99 = k.p50 - d.p50, k.p99 - d.p99
            lines.append(f"- {sc}, c=1: added p50 {a50:.3f} ms (target <= 0.5): {_verdict(a50, 0.5)}; "
                         f"added p99 {a99:.3f} ms (target <= 2): {_verdict(a99, 2.0)}")
    for sc in ("chat", "chat-stream"):
        k, ll = by.get((sc, "kaiyuan", 64)), by.get((sc, "litellm", 64))
        if k and ll and ll.rps > 0:
            ratio = k.rps / ll.rps
            verdict = "PASS" if ratio >= 5 else f"MISS (short by {5 - ratio:.2f}x)"
            lines.append(f"- {sc}, c=64: Kaiyuan {k.rps:.0f} req/s vs LiteLLM {ll.rps:.0f} req/s = {ratio:.1f}x "
                         f"(target >= 5x): {verdict}")
        elif k and ll:
            lines.append(f"- {sc}, c=64: Kaiyuan {k.rps:.0f} req/s; LiteLLM finished no request inside the measured "
                         f"window (its latency is longer than the window), so the ratio is unbounded: PASS")
        elif k:
            lines.append(f"- {sc}, c=64: Kaiyuan {k.rps:.0f} req/s; LiteLLM not measured, ratio unknown")
    for h in holds:
        if h.target.startswith("kaiyuan"):
            lines.append(f"- {h.streams} concurrent streams through {h.target}: {h.ok} ok, {h.chunks_lost} chunks lost, "
                         f"{h.errors} errors, peak {h.peak_upstream_streams} open upstream: "
                         f"{'PASS' if h.held else 'MISS'}")
    return lines


FLOOR_NAMES = ("floor-aiohttp", "floor-granian")


def floor_table(cells: list[Cell], wrks: list[WrkResult]) -> list[str]:
    """Kaiyuan's throughput, CPU per request and added latency as ratios to each floor's, per cell."""
    by = {(c.scenario, c.target, c.concurrency): c for c in cells}
    rows = []
    for c in cells:
        if not c.target.startswith("kaiyuan"):
            continue
        direct = by.get((_baseline_of(c.scenario), "direct", c.concurrency))
        for fl in FLOOR_NAMES:
            f0 = by.get((c.scenario, fl, c.concurrency))
            if f0 is None:
                continue
            add_k = _diff(c.p50, direct.p50 if direct else None)
            add_f = _diff(f0.p50, direct.p50 if direct else None)
            rows.append(f"| {c.scenario} | {c.concurrency} | {c.target} | {fl} | {_x(_ratio(c.rps, f0.rps))} | "
                        f"{f(c.cpu_us_per_req, 0)} / {f(f0.cpu_us_per_req, 0)} | {_x(_ratio(c.cpu_us_per_req, f0.cpu_us_per_req))} | "
                        f"{f(add_k, 3)} / {f(add_f, 3)} | {f(_diff(add_k, add_f), 3)} |")
    wby = {(x.scenario, x.target, x.concurrency): x for x in wrks}
    wrows = []
    for x in wrks:
        if not x.target.startswith("kaiyuan"):
            continue
        for fl in FLOOR_NAMES:
            f0 = wby.get((x.scenario, fl, x.concurrency))
            if f0 is not None:
                wrows.append(f"| {x.scenario} | {x.concurrency} | {x.target} | {fl} | {f(x.rps, 0)} / {f(f0.rps, 0)} | "
                             f"{_x(_ratio(x.rps, f0.rps))} |")
    out = []
    if rows:
        out += ["`rps x`: Kaiyuan's req/s over the floor's; `CPU`: us per request, Kaiyuan / floor; `added p50`: ms over "
                "direct, Kaiyuan / floor; `gap`: the difference (issue 13's target at c=1: <= 0.1 ms).\n",
                "| scenario | c | target | floor | rps x | CPU us/req | CPU x | added p50 | gap |",
                "|---|---:|---|---|---:|---:|---:|---:|---:|", *rows, ""]
    if wrows:
        out += ["wrk:\n", "| scenario | c | target | floor | req/s (target / floor) | x |", "|---|---:|---|---|---:|---:|", *wrows]
    return out


def verdicts_13(cells: list[Cell], wrks: list[WrkResult]) -> list[str]:
    """Issue 13's goals for the plain Kaiyuan column (request log and metrics on)."""
    by = {(c.scenario, c.target, c.concurrency): c for c in cells}
    lines = []
    best = max((x for x in wrks if x.scenario == "chat" and x.target == "kaiyuan"), key=lambda x: x.rps, default=None)
    if best is not None:
        lines.append(f"- non-streaming throughput, one core (wrk c={best.concurrency}): {best.rps:.0f} req/s "
                     f"(target >= 4,000): {'PASS' if best.rps >= 4000 else 'MISS'}")
    k64 = by.get(("chat", "kaiyuan", 64))
    if k64 is not None and k64.cpu_us_per_req is not None:
        lines.append(f"- CPU per non-streaming request at c=64: {k64.cpu_us_per_req:.0f} us (target <= 250): "
                     f"{'PASS' if k64.cpu_us_per_req <= 250 else 'MISS'}")
    s64 = by.get(("chat-stream", "kaiyuan", 64))
    if s64 is not None:
        ok = s64.rps >= 2500 and s64.chunks_lost == 0
        lines.append(f"- streams at c=64: {s64.rps:.0f}/s, {s64.chunks_lost} chunks lost (target >= 2,500/s, none lost): "
                     f"{'PASS' if ok else 'MISS'}")
    for sc in ("chat", "chat-stream"):
        k, d, fl = by.get((sc, "kaiyuan", 1)), by.get((sc, "direct", 1)), by.get((sc, "floor-aiohttp", 1))
        if k and d and fl and None not in (k.p50, d.p50, fl.p50, k.p99):
            gap = (k.p50 - d.p50) - (fl.p50 - d.p50)
            lines.append(f"- {sc}, c=1: added p50 {gap:+.3f} ms over the aiohttp floor's (target <= 0.1): "
                         f"{'PASS' if gap <= 0.1 else 'MISS'}; p99 {k.p99:.2f} ms (target <= 1.5): "
                         f"{'PASS' if k.p99 <= 1.5 else 'MISS'}")
    return lines or ["- not measured in this run"]


def _verdict(value: float, limit: float) -> str:
    return "PASS" if value <= limit else f"MISS by {value - limit:.3f} ms"


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def fmt_load(la: Any) -> str:
    if not la:
        return "?"
    return " ".join(f"{x:.2f}" for x in la)
