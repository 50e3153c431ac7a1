"""The spend ledger: one row per priced request, written in batches off the request path.

``record`` only queues the row in the shared bounded writer (``kaiyuan.store.batch_writer``,
overflow ``hold``): a money row is never dropped. Instead the ledger fails closed: while its queue
is full, or while the database is found unavailable, :meth:`check` raises a 503 and the guard
refuses new billed requests before reserving anything, so what a crash can lose stays bounded (the
rows of about one flush interval). A row the database refuses (a value out of range, a duplicate
request id) is set aside, logged with its content, and never blocks the rows behind it.

The ledger is the authority on spend: :meth:`spent_since` reads it uncached and adds the rows
this replica has queued but not written yet (the Redis counters are re-seeded from it).
"""

from __future__ import annotations

from typing import NamedTuple

from sqlalchemy import Engine

from kaiyuan.accounting import keystore
from kaiyuan.context import RequestContext
from kaiyuan.store.batch_writer import BatchWriter, WriterMetrics, WriterSpec
from kaiyuan.store.boundary import call, unavailable_error

BATCH = 1000
MAX_QUEUE = 100_000


class SpendRow(NamedTuple):
    """One ``spend_ledger`` row, its fields the table's columns in order (written as a tuple)."""

    request_id: str
    ts: float
    key_id: str | None
    team_id: str | None
    user_id: str | None
    model: str | None
    deployment: str | None
    upstream_model: str | None
    vendor: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None
    cost_usd: float | None


class SpendLedger:
    def __init__(self, engine: Engine | None, flush_interval_s: float, metrics: WriterMetrics,
                 max_queue: int = MAX_QUEUE) -> None:
        self.engine = engine
        spec = WriterSpec("spend_ledger", max_queue, BATCH, flush_interval_s, "hold")
        self.writer: BatchWriter[SpendRow] = BatchWriter(spec, self._write, metrics)

    def record(self, ctx: RequestContext, cost: float, upstream_model: str | None, vendor: str | None) -> None:
        """Queue the request's spend row (nothing without a store)."""
        if self.engine is None:
            return
        self.writer.start()
        u = ctx.usage
        p = ctx.principal
        # tuple.__new__: the named tuple's own __new__ is a Python function, several times the cost
        self.writer.put(tuple.__new__(SpendRow, (
            ctx.request_id, ctx.started_wall, p.key_id, p.team_id, p.user_id, ctx.model, ctx.deployment,
            upstream_model, vendor, u.prompt_tokens, u.completion_tokens, u.cached_tokens, cost,
        )))

    def check(self) -> None:
        """Fail closed: refuse (503) while spend cannot be recorded (queue full, or database down)."""
        w = self.writer
        if self.engine is not None and (w.full or not w.healthy):
            raise unavailable_error()

    async def spent_since(self, scope: str, scope_id: str, since: float, queued: bool = True) -> float:
        """Spend of a key or team since ``since``: the ledger (an uncached read) plus, if ``queued``,
        this replica's rows not written yet. The queue is copied before the read, so a row written
        meanwhile is counted twice (too much, never too little). A database that is down is a 503."""
        assert self.engine is not None
        rows = self.writer.rows() if queued else []
        unwritten = sum(r.cost_usd or 0.0 for r in rows
                        if (r.key_id if scope == "key" else r.team_id) == scope_id and r.ts >= since)
        return await call(keystore.spent_since, self.engine, scope, scope_id, since) + unwritten

    def seq_of(self, request_id: str) -> int | None:
        """The number of ``request_id``'s row if it is the last one queued (it is, between
        ``record`` and the release that follows it with no await between); else None. The row is
        written once ``writer.done`` exceeds it (rows are written in queue order)."""
        w = self.writer
        last = w.last()
        return w.queued - 1 if last is not None and last.request_id == request_id else None

    async def flush(self) -> int:
        """Write every queued row; the number written (rows kept while the database is down)."""
        return await self.writer.flush()

    async def close(self) -> None:
        await self.writer.close()

    def _write(self, rows: list[SpendRow]) -> None:
        assert self.engine is not None
        keystore.write_spend(self.engine, SpendRow._fields, rows)
