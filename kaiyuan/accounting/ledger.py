"""The spend ledger: one row per priced request, written in batches off the request path.

``record`` only appends to an in-memory queue; a background task writes the queue every
``accounting.spend_flush_interval_s`` (and ``flush`` on demand: the admin API before reading
spend, shutdown). A failed write keeps its rows for the next try. The interface is three calls,
``record``, ``flush`` and ``close``, so the writer behind it can change without touching callers.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from sqlalchemy import Engine

from kaiyuan.accounting import keystore
from kaiyuan.context import RequestContext

log = logging.getLogger("kaiyuan.ledger")

BATCH = 1000


class SpendLedger:
    def __init__(self, engine: Engine | None, flush_interval_s: float) -> None:
        self.engine = engine
        self.flush_interval_s = flush_interval_s
        self._rows: deque[dict[str, Any]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def record(self, ctx: RequestContext, cost: float, upstream_model: str | None, vendor: str | None) -> None:
        """Queue the request's spend row (nothing without a store)."""
        if self.engine is None:
            return
        if self._task is None and not self._closing:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="kaiyuan-spend-ledger")
        u = ctx.usage
        p = ctx.principal
        self._rows.append({
            "request_id": ctx.request_id, "ts": ctx.started_wall, "key_id": p.key_id, "team_id": p.team_id,
            "user_id": p.user_id, "model": ctx.model, "deployment": ctx.deployment, "upstream_model": upstream_model,
            "vendor": vendor, "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "cached_tokens": u.cached_tokens, "cost_usd": cost,
        })

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            await self.flush()

    async def flush(self) -> int:
        """Write every queued row; the number written (rows that failed stay queued)."""
        written = 0
        while self._rows and self.engine is not None:
            batch = [self._rows[i] for i in range(min(len(self._rows), BATCH))]
            try:
                await asyncio.to_thread(keystore.write_spend, self.engine, batch)
            except Exception as e:
                log.error("spend ledger write failed (%d rows kept, will retry): %s", len(self._rows), e)
                return written
            for _ in batch:
                self._rows.popleft()
            written += len(batch)
        return written

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.flush()
