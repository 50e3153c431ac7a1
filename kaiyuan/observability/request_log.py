"""The request log writer: rows go into an in-memory queue on the request path and are written
in batches by a background task, so no request waits for the database.

The queue, batching and bad-row handling are the shared ``kaiyuan.store.batch_writer``'s. A crash
loses at most one flush interval of rows. When the queue is full (the database is down for long),
new rows are dropped and counted in ``kaiyuan_store_rows_dropped{writer="request_log"}``.
"""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import Engine

from kaiyuan.config import RequestLogSettings
from kaiyuan.context import RequestContext
from kaiyuan.redact import clip, clip_scrubbed, scrub
from kaiyuan.store.batch_writer import BatchWriter, WriterMetrics, WriterSpec
from kaiyuan.store.fast_insert import insert_rows
from kaiyuan.store.schema import request_log

# Logged strings that come from callers or upstreams are bounded (a 16 MiB model name must not
# become 16 MiB of log row) and scrubbed of secrets (kaiyuan.redact).
MAX_NAME_CHARS = 256
MAX_ERROR_CHARS = 2000


def shown(v: str | None) -> str | None:
    """A name from a caller or upstream as it may be logged or echoed back: at most MAX_NAME_CHARS."""
    return clip(v, MAX_NAME_CHARS)


def _error(v: str | None) -> str | None:
    """An error for the log: scrubbed and cut, at a cost bounded by the cut (a megabyte-long error
    string was scrubbed whole before it was cut)."""
    return clip_scrubbed(v, MAX_ERROR_CHARS) if v else v


def row_for(ctx: RequestContext) -> dict[str, Any]:
    u = ctx.usage
    attempt_log = None
    if ctx.attempts:
        attempt_log = orjson.dumps(
            [
                {"model": shown(a.model), "deployment": a.deployment, "status": a.status, "error": _error(a.error), "ms": a.ms}
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
        "model": shown(ctx.model),
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
        "policy": shown(ctx.policy),
        "trial": shown(ctx.trial),
        "cancelled": ctx.cancelled,
        "error": _error(ctx.error),
        "request_body": ctx.raw_body.decode("utf-8", "replace") if ctx.log_bodies and ctx.raw_body else None,
        "response_body": scrub(ctx.response_body.decode("utf-8", "replace")) if ctx.log_bodies and ctx.response_body else None,
    }


class RequestLogWriter:
    """The request log's rows through the shared :class:`BatchWriter` (overflow: drop, counted)."""

    def __init__(self, engine: Engine | None, settings: RequestLogSettings, metrics: WriterMetrics) -> None:
        self.engine = engine
        self.settings = settings
        spec = WriterSpec("request_log", settings.max_queue, settings.batch_size, settings.flush_interval_s, "drop")
        self.writer: BatchWriter[dict[str, Any]] = BatchWriter(spec, self._write, metrics, _describe)

    def submit(self, ctx: RequestContext) -> None:
        if self.engine is None or not self.settings.enabled:
            return
        self.writer.put(row_for(ctx))

    def put_rows(self, rows: list[dict[str, Any]]) -> None:
        """Queue rows built elsewhere (a worker's, shipped to the supervisor's sink)."""
        if self.engine is None:
            return
        for row in rows:
            if isinstance(row, dict):
                self.writer.put(row)

    async def start(self) -> None:
        if self.engine is not None:
            self.writer.start()

    async def flush(self) -> int:
        """Write everything queued now; returns rows written. Keeps rows queued if the database is down."""
        return await self.writer.flush()

    async def close(self) -> None:
        await self.writer.close()

    @property
    def pending(self) -> int:
        return self.writer.pending

    def _write(self, batch: list[dict[str, Any]]) -> None:
        if self.engine is None:
            return
        with self.engine.begin() as conn:
            insert_rows(conn, request_log, batch)


def _describe(row: dict[str, Any]) -> str:
    """A refused row for the log: everything but the bodies (they can be large and private)."""
    return repr({k: v for k, v in row.items() if k not in ("request_body", "response_body")})
