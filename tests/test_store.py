"""Schema migrations and the batched request-log writer, on SQLite and (when available) PostgreSQL."""

from __future__ import annotations

import os
import uuid

import pytest
from sqlalchemy import func, select, text

from kaiyuan.config import RequestLogSettings
from kaiyuan.context import RequestContext, Usage
from kaiyuan.observability.metrics import Metrics
from kaiyuan.observability.request_log import RequestLogWriter
from kaiyuan.store.db import current_revision, make_engine, open_store
from kaiyuan.store.schema import request_log


def _urls(tmp_path) -> list[str]:  # type: ignore[no-untyped-def]
    urls = [f"sqlite:///{tmp_path}/store.db"]
    if os.environ.get("KAIYUAN_TEST_POSTGRES_URL"):
        urls.append(os.environ["KAIYUAN_TEST_POSTGRES_URL"])
    return urls


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"
    url = os.environ.get("KAIYUAN_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("KAIYUAN_TEST_POSTGRES_URL is not set (scripts/test.sh starts PostgreSQL when it is installed)")
    schema = "t" + uuid.uuid4().hex[:10]
    eng = make_engine(url)
    with eng.begin() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    eng.dispose()
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


async def test_writer_batches_rows_and_survives_a_down_database(db_url: str) -> None:
    engine = open_store(db_url)
    assert current_revision(engine) is not None
    open_store(db_url)  # running migrations again is a no-op
    w = RequestLogWriter(engine, RequestLogSettings(batch_size=7), Metrics().store)
    for i in range(20):
        ctx = RequestContext(f"r{i}", "openai", "chat", model="m", status=200, usage=Usage(3, 4, 1, 0))
        w.submit(ctx)
    assert w.pending == 20
    assert await w.flush() == 20
    with engine.connect() as c:
        assert c.execute(select(func.count()).select_from(request_log)).scalar() == 20
        assert c.execute(select(request_log.c.cached_tokens).where(request_log.c.id == "r3")).scalar() == 1
    # A row the database rejects is dropped (and counted) without blocking the rows beside it.
    w.submit(RequestContext("fresh", "openai", "chat", status=200))
    w.submit(RequestContext("r0", "openai", "chat", status=200))  # primary key clash
    assert await w.flush() == 1 and w.pending == 0
    # A database that is down keeps every row queued for the next flush; none are lost.
    engine.dispose()
    w.engine = make_engine(f"sqlite:///{os.path.dirname(engine.url.database or '') or '/'}")  # a directory: unopenable
    w.submit(RequestContext("later", "openai", "chat", status=200))
    assert await w.flush() == 0 and w.pending == 1
    w.engine = engine
    assert await w.flush() == 1 and w.pending == 0


async def test_queue_limit_drops_and_counts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = open_store(f"sqlite:///{tmp_path}/q.db")
    m = Metrics()
    w = RequestLogWriter(engine, RequestLogSettings(max_queue=5), m.store)
    for i in range(8):
        w.submit(RequestContext(f"q{i}", "openai", "chat", status=200))
    assert w.pending == 5
    assert 'kaiyuan_store_rows_dropped_total{writer="request_log"} 3.0' in m.render().decode()
