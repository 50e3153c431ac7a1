"""The hourly usage rollup: the request log summed per (hour, model, deployment, team, key, status).

Pages read ``usage_hourly`` (a few thousand rows for a month) instead of the log (a million).
A background task, off the request path, catches up every ``console.rollup_interval_s``:

* a closed hour (ended more than ``GRACE_S`` ago, so its batched log rows have landed) is summed
  once and marked in ``rollup_hours``; with many replicas the first to insert the mark wins;
* the open hours (the current one and any still within the grace) are summed again on every pass.

Rows written for a closed hour after it was rolled up (for example an import of old logs) are not
counted until :func:`rebuild` runs (``kaiyuan console-rollup --rebuild``, kaiyuan/console/cli.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, delete, func, insert, select
from sqlalchemy.exc import IntegrityError

from kaiyuan.console import histogram
from kaiyuan.store.schema import request_log, rollup_hours, usage_hourly

log = logging.getLogger("kaiyuan.console.rollup")

HOUR = 3600
GRACE_S = 300.0
# Rows read per fetch. Small: a pass runs in a thread beside a serving event loop, and every row
# fetched at once is a burst of Python objects that the allocator keeps arenas for afterwards.
YIELD_ROWS = 1000
_COLS = (request_log.c.model, request_log.c.deployment, request_log.c.team_id, request_log.c.key_id, request_log.c.status,
         request_log.c.prompt_tokens, request_log.c.completion_tokens, request_log.c.cached_tokens, request_log.c.cost_usd,
         request_log.c.latency_ms, request_log.c.ttft_ms)


@dataclass
class _Acc:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0
    cost_unknown: int = 0
    priced: list[int] = field(default_factory=lambda: [0, 0, 0])  # prompt, completion, cached tokens of priced requests
    latency: histogram.Hist = field(default_factory=dict)
    ttft: histogram.Hist = field(default_factory=dict)


def _sum_hour(conn: Any, hour: int) -> list[dict[str, Any]]:
    """One hour of the log, summed (read with the ts index; streamed, not held)."""
    t = request_log
    groups: dict[tuple[str, str, str, str, int], _Acc] = {}
    q = select(*_COLS).where(t.c.ts >= hour * HOUR, t.c.ts < (hour + 1) * HOUR)
    for r in conn.execute(q, execution_options={"yield_per": YIELD_ROWS}):
        k = (r[0] or "", r[1] or "", r[2] or "", r[3] or "", int(r[4]))
        a = groups.get(k)
        if a is None:
            a = groups[k] = _Acc()
        a.requests += 1
        a.prompt_tokens += r[5] or 0
        a.completion_tokens += r[6] or 0
        a.cached_tokens += r[7] or 0
        if r[8] is None:
            a.cost_unknown += k[4] < 400
        else:
            a.cost_usd += r[8]
            a.priced[0] += r[5] or 0
            a.priced[1] += r[6] or 0
            a.priced[2] += r[7] or 0
        histogram.add(a.latency, r[9])
        histogram.add(a.ttft, r[10])
    return [
        {"hour": hour, "model": k[0], "deployment": k[1], "team_id": k[2], "key_id": k[3], "status": k[4],
         "requests": a.requests, "prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens,
         "cached_tokens": a.cached_tokens, "cost_usd": a.cost_usd, "cost_unknown": a.cost_unknown,
         "priced_prompt_tokens": a.priced[0], "priced_completion_tokens": a.priced[1], "priced_cached_tokens": a.priced[2],
         "latency_hist": histogram.dumps(a.latency), "ttft_hist": histogram.dumps(a.ttft)}
        for k, a in groups.items()
    ]


def _replace_hour(engine: Engine, hour: int, mark: bool) -> bool:
    """Sum ``hour`` into usage_hourly; with ``mark`` also claim it as closed. False: another replica did."""
    try:
        with engine.begin() as conn:
            if mark:
                if conn.execute(select(rollup_hours.c.hour).where(rollup_hours.c.hour == hour)).first() is not None:
                    return False
            rows = _sum_hour(conn, hour)
            conn.execute(delete(usage_hourly).where(usage_hourly.c.hour == hour))
            if rows:
                conn.execute(insert(usage_hourly), rows)
            if mark:
                conn.execute(insert(rollup_hours), [{"hour": hour, "rows": sum(r["requests"] for r in rows)}])
        return True
    except IntegrityError:  # another replica wrote the same hour at the same time: theirs stands
        return False


def _next_hour_with_rows(conn: Any, after_hour: int, before_hour: int) -> int | None:
    t = request_log
    ts = conn.execute(select(func.min(t.c.ts)).where(t.c.ts >= (after_hour + 1) * HOUR, t.c.ts < before_hour * HOUR)).scalar()
    return None if ts is None else int(ts // HOUR)


def catch_up(engine: Engine, now: float | None = None) -> int:
    """Roll up every closed hour not yet marked, and refresh the open ones. Returns hours written."""
    now = time.time() if now is None else now
    first_open = int((now - GRACE_S) // HOUR)  # hours >= this may still receive rows
    written = 0
    with engine.connect() as conn:
        done = conn.execute(select(func.max(rollup_hours.c.hour))).scalar()
    h = -1 if done is None else int(done)
    while True:
        with engine.connect() as conn:
            nxt = _next_hour_with_rows(conn, h, first_open)
        if nxt is None:
            break
        written += _replace_hour(engine, nxt, mark=True)
        h = nxt
    for hour in range(first_open, int(now // HOUR) + 1):
        written += _replace_hour(engine, hour, mark=False)
    return written


def rebuild(engine: Engine, now: float | None = None) -> int:
    """Drop every rollup and sum the whole log again (after importing old rows)."""
    with engine.begin() as conn:
        conn.execute(delete(usage_hourly))
        conn.execute(delete(rollup_hours))
    return catch_up(engine, now)


MAX_SHARE = 0.1  # of the wall clock that passes of the rollup may take


def next_wait(interval_s: float, took_s: float) -> float:
    """Seconds until the next pass: ``interval_s``, or longer when a pass is slow, so the rollup
    takes at most MAX_SHARE of the time. A pass re-sums the open hour, so it grows through the hour
    (about 2.5 s of CPU per million rows): at thousands of requests a second, a fixed 30 s interval
    would have it running most of the time by the hour's end, beside the event loop."""
    return max(interval_s, took_s * (1 - MAX_SHARE) / MAX_SHARE)


class RollupTask:
    """Runs :func:`catch_up` in a thread every ``interval_s``; :meth:`refresh` for a page that wants fresh numbers."""

    def __init__(self, engine: Engine, interval_s: float) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.last_run = 0.0
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="kaiyuan-console-rollup")

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.refresh(max_age_s=0)
            except Exception:  # the next pass retries; a page still shows the last rollup
                log.exception("console rollup failed")
            await asyncio.sleep(next_wait(self.interval_s, time.monotonic() - started))

    async def refresh(self, max_age_s: float = 5.0) -> None:
        """Catch up unless another pass finished less than ``max_age_s`` ago (one pass at a time)."""
        async with self._lock:
            if time.time() - self.last_run < max_age_s:
                return
            await asyncio.to_thread(catch_up, self.engine)
            self.last_run = time.time()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
