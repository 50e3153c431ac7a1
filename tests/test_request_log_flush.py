"""The request-log writer under concurrent flushes (the background task, shutdown, a caller)."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import func, select

from kaiyuan.config import RequestLogSettings
from kaiyuan.context import RequestContext
from kaiyuan.observability.metrics import Metrics
from kaiyuan.observability.request_log import RequestLogWriter
from kaiyuan.store.db import open_store
from kaiyuan.store.schema import request_log


def test_concurrent_flushes_write_every_row_once(tmp_path: Any) -> None:
    engine = open_store(f"sqlite:///{tmp_path}/c.db")
    metrics = Metrics()
    w = RequestLogWriter(engine, RequestLogSettings(batch_size=5), metrics.store)

    async def go() -> list[int]:
        for i in range(23):
            w.submit(RequestContext(f"r{i}", "openai", "chat", model="m", status=200))
        first = await asyncio.gather(w.flush(), w.flush(), w.flush())
        for i in range(23, 30):  # rows that arrive while flushes are under way are kept too
            w.submit(RequestContext(f"r{i}", "openai", "chat", model="m", status=200))
        return [*first, await w.flush()]

    written = asyncio.run(go())
    assert sum(written) == 30 and w.pending == 0
    with engine.connect() as c:
        assert c.execute(select(func.count()).select_from(request_log)).scalar() == 30
    assert metrics.store.dropped.labels("request_log")._value.get() == 0
