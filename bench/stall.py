"""Stalls on purpose for the memory soak (issue 13, round 5): is a stall's memory step bounded?

In 500 req/s soaks on a shared machine the serving process was flat between events and stepped up
by 1-5 MiB whenever the machine stalled it, never coming back down. If each step is the high-water
mark of the largest burst of requests in flight so far, a second stall of the same size adds
nothing; if something is left behind per stall, every stall adds. To tell the two apart without
waiting for the machine, ``bench/soak.py --stall-every S --stall-for S`` stops the serving process
(``SIGSTOP``) for ``--stall-for`` seconds every ``--stall-every`` seconds while the driver keeps its
rate (requests pile up in the kernel's socket queues, up to the driver's in-flight cap), then lets
it go (``SIGCONT``). Each stall records the serving process's RSS just before it and
``settle_s`` after it, so the report gives each stall's own step and the drift between stalls.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Stall:
    t_s: float  # seconds since the load started, when the process was stopped
    for_s: float  # how long it was stopped, measured
    inflight_at_resume: int  # the driver's requests in flight when it was let go
    rss_before_mib: float  # the serving process, just before the stop
    rss_after_mib: float | None  # the same, settle_s after the resume (None: the run ended first)


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def stall_loop(pid: int, every_s: float, for_s: float, inflight: Callable[[], int], out: list[Stall],
                     settle_s: float = 10.0) -> None:
    """Stop ``pid`` for ``for_s`` seconds every ``every_s`` seconds (the first after ``every_s``) until
    cancelled; the process is always let go again, also when cancelled mid-stall."""
    start = time.perf_counter()
    k = 1
    while True:
        await asyncio.sleep(max(0.0, start + k * every_s - time.perf_counter()))
        k += 1
        before = rss_mib(pid)
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(for_s)
        finally:
            os.kill(pid, signal.SIGCONT)
        stall = Stall(round(t0 - start, 2), round(time.perf_counter() - t0, 3), inflight(), round(before, 3), None)
        out.append(stall)
        await asyncio.sleep(min(settle_s, every_s - for_s))
        stall.rss_after_mib = round(rss_mib(pid), 3)


def summary(stalls: list[Stall]) -> dict[str, object]:
    """Each stall's step (after - before) and the drift between stalls (before[k+1] - after[k])."""
    done = [s for s in stalls if s.rss_after_mib is not None]
    steps = [round(s.rss_after_mib - s.rss_before_mib, 3) for s in done if s.rss_after_mib is not None]
    between = [round(b.rss_before_mib - a.rss_after_mib, 3) for a, b in itertools.pairwise(done) if a.rss_after_mib is not None]
    return {
        "count": len(stalls),
        "steps_mib": steps,
        "first_step_mib": steps[0] if steps else None,
        "later_steps_sum_mib": round(sum(steps[1:]), 3) if len(steps) > 1 else None,
        "between_stalls_sum_mib": round(sum(between), 3) if between else None,
        "inflight_at_resume": [s.inflight_at_resume for s in stalls],
        "stalls": [s.__dict__ for s in stalls],
    }
