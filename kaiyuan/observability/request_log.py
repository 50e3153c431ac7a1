"""The request log writer: rows go into an in-memory queue on the request path and are written
in batches by a background task, so no request waits for the database.

A crash loses at most one flush interval of rows. When the queue is full (the database is down
for long), new rows are dropped and counted in ``kaiyuan_request_log_dropped``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from functools import lru_cache
from operator import itemgetter
from typing import Any

import orjson
from sqlalchemy import Engine
from sqlalchemy.exc import DataError, IntegrityError

from kaiyuan.config import RequestLogSettings
from kaiyuan.context import RequestContext
from kaiyuan.observability.metrics import Metrics
from kaiyuan.redact import clip, scrub, scrub_opt
from kaiyuan.store.schema import request_log

log = logging.getLogger("kaiyuan.request_log")
# Errors about a row's contents, not the database being down (the driver raises OverflowError /
# ValueError itself for an integer or a string it cannot bind): such a row is dropped, not retried.
ROW_ERRORS = (IntegrityError, DataError, OverflowError, ValueError, TypeError)


# Logged strings that come from callers or upstreams are bounded (a 16 MiB model name must not
# become 16 MiB of log row) and scrubbed of secrets (kaiyuan.redact).
MAX_NAME_CHARS = 256
MAX_ERROR_CHARS = 2000


def _name(v: str | None) -> str | None:
    return clip(v, MAX_NAME_CHARS)


def _error(v: str | None) -> str | None:
    return clip(scrub_opt(v), MAX_ERROR_CHARS)


def row_for(ctx: RequestContext) -> dict[str, Any]:
    u = ctx.usage
    attempt_log = None
    if ctx.attempts:
        attempt_log = orjson.dumps(
            [
                {"model": _name(a.model), "deployment": a.deployment, "status": a.status, "error": _error(a.error), "ms": a.ms}
                for a in ctx.attempts[:32]
            ]
        ).decode()
    return {
        "id": ctx.request_id,
        "ts": ctx.started_wall,
        "key_id": ctx.principal.key_id,
        "team_id": ctx.principal.team_id,
        "dialect": ctx.dialect,
        "endpoint": ctx.endpoint,
        "model": _name(ctx.model),
        "deployment": ctx.deployment,
        "stream": ctx.stream,
        "status": ctx.status,
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "cached_tokens": u.cached_tokens,
        "reasoning_tokens": u.reasoning_tokens,
        "cost_usd": ctx.cost_usd,
        "latency_ms": round(ctx.elapsed() * 1000, 3),
        "ttft_ms": round(ctx.ttft * 1000, 3) if ctx.ttft is not None else None,
        "attempts": len(ctx.attempts),
        "attempt_log": attempt_log,
        "policy": _name(ctx.policy),
        "trial": _name(ctx.trial),
        "cancelled": ctx.cancelled,
        "error": _error(ctx.error),
        "request_body": ctx.raw_body.decode("utf-8", "replace") if ctx.log_bodies and ctx.raw_body else None,
        "response_body": scrub(ctx.response_body.decode("utf-8", "replace")) if ctx.log_bodies and ctx.response_body else None,
    }


_ALL_COLUMNS = frozenset(c.name for c in request_log.columns)


@lru_cache(maxsize=8)
def _sqlite_insert(cols: tuple[str, ...]) -> str:
    names = ", ".join(f'"{c}"' for c in cols)
    return f"INSERT INTO {request_log.name} ({names}) VALUES ({', '.join('?' * len(cols))})"


class RequestLogWriter:
    def __init__(self, engine: Engine | None, settings: RequestLogSettings, metrics: Metrics) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self._queue: deque[dict[str, Any]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._flushing = asyncio.Lock()

    def submit(self, ctx: RequestContext) -> None:
        if self.engine is None or not self.settings.enabled:
            return
        if len(self._queue) >= self.settings.max_queue:
            self.metrics.log_dropped.inc()
            return
        self._queue.append(row_for(ctx))
        if len(self._queue) >= self.settings.batch_size:
            self._wake.set()

    async def start(self) -> None:
        if self._task is None and self.engine is not None:
            self._task = asyncio.create_task(self._run(), name="kaiyuan-request-log")

    async def _run(self) -> None:
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.flush_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> int:
        """Write everything queued now; returns rows written. Keeps rows queued if the write fails."""
        async with self._flushing:  # one at a time: two would write, then pop, the same batch
            return await self._flush()

    async def _flush(self) -> int:
        written = 0
        while self._queue:
            n = min(len(self._queue), self.settings.batch_size)
            batch = [self._queue[i] for i in range(n)]
            try:
                await asyncio.to_thread(self._write, batch)
                ok = n
            except ROW_ERRORS:
                # One bad row must not block the queue: write the batch row by row, drop the bad ones.
                try:
                    ok = await asyncio.to_thread(self._write_each, batch)
                except Exception as e:
                    log.error("request log write failed (%d rows kept, will retry): %s", len(self._queue), e)
                    return written
            except Exception as e:  # database down: keep everything, retry next interval
                log.error("request log write failed (%d rows kept, will retry): %s", len(self._queue), e)
                return written
            for _ in range(n):
                self._queue.popleft()
            written += ok
            self.metrics.log_written.inc(ok)
        return written

    def _write(self, batch: list[dict[str, Any]]) -> None:
        assert self.engine is not None
        with self.engine.begin() as conn:
            if conn.dialect.name == "sqlite" and batch:
                # Plain executemany with tuples: half the CPU of SQLAlchemy's per-row parameter
                # processing, and this thread competes with the event loop for the GIL.
                cols = tuple(batch[0])
                # Only complete rows: SQLAlchemy applies the columns' Python-side defaults, this does not.
                if _ALL_COLUMNS.issuperset(cols) and len(cols) == len(_ALL_COLUMNS) and all(len(r) == len(cols) for r in batch):
                    get = itemgetter(*cols)
                    try:
                        params = [get(r) for r in batch]
                    except KeyError:  # rows with different keys: let SQLAlchemy sort them out
                        pass
                    else:
                        conn.exec_driver_sql(_sqlite_insert(cols), params)
                        return
            conn.execute(request_log.insert(), batch)

    def _write_each(self, batch: list[dict[str, Any]]) -> int:
        ok = 0
        for row in batch:
            try:
                self._write([row])
                ok += 1
            except ROW_ERRORS as e:
                self.metrics.log_dropped.inc()
                log.error("request log row %s dropped: %s", row.get("id"), getattr(e, "orig", e))
        return ok

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await self._task
            except Exception:  # pragma: no cover - best effort on shutdown
                pass
            self._task = None
        await self.flush()

    @property
    def pending(self) -> int:
        return len(self._queue)
