"""The one bounded batch writer: overflow policies, bad rows set aside without blocking the rows
behind them, a database that is down keeps every row, and the spend ledger fails closed.

Runs on SQLite, and on PostgreSQL when KAIYUAN_TEST_POSTGRES_URL is set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import OperationalError

from kaiyuan.accounting.ledger import SpendLedger
from kaiyuan.context import Principal, RequestContext, Usage
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.observability.metrics import Metrics
from kaiyuan.store.batch_writer import BatchWriter, WriterSpec
from kaiyuan.store.db import make_engine, open_store
from kaiyuan.store.schema import spend_ledger
from tests.test_migrations_keys import drop_pg_database, fresh_pg_database


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "sqlite":
        yield open_store(f"sqlite:///{tmp_path}/w.db")
        return
    base = os.environ.get("KAIYUAN_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("KAIYUAN_TEST_POSTGRES_URL is not set (scripts/test.sh starts PostgreSQL when it is installed)")
    url, eng = fresh_pg_database(base)
    eng.dispose()
    eng = open_store(url)
    yield eng
    eng.dispose()
    drop_pg_database(base, url)


def _ctx(i: int, completion: int = 10, key: str = "k1") -> RequestContext:
    c = RequestContext(f"req-{i}", "openai", "chat", model="m", status=200, usage=Usage(5, completion, 0, 0))
    c.principal = Principal(key_id=key)
    return c


def _ledger_rows(engine: Engine) -> list[str]:
    with engine.connect() as c:
        return sorted(r[0] for r in c.execute(select(spend_ledger.c.request_id)))


def _value(m: Metrics, name: str, writer: str) -> float:
    v = m.registry.get_sample_value(name, {"writer": writer})
    return v or 0.0


async def test_a_refused_row_is_set_aside_and_never_blocks_the_rows_behind_it(engine: Engine) -> None:
    m = Metrics()
    ledger = SpendLedger(engine, 60, m.store)
    ledger.record(_ctx(0), 0.01, "up", "v")
    # 3e9 completion tokens: out of range for PostgreSQL's INTEGER; 2**70 cannot be bound by SQLite
    huge = 3_000_000_000 if engine.dialect.name == "postgresql" else 2**70
    ledger.record(_ctx(1, completion=huge), 0.02, "up", "v")
    for i in range(2, 6):
        ledger.record(_ctx(i), 0.01, "up", "v")
    assert await ledger.flush() == 5
    assert ledger.writer.pending == 0 and ledger.writer.healthy
    assert _ledger_rows(engine) == ["req-0", "req-2", "req-3", "req-4", "req-5"]
    assert _value(m, "kaiyuan_store_rows_set_aside_total", "spend_ledger") == 1
    # later rows keep flowing, in one batch again
    ledger.record(_ctx(6), 0.01, "up", "v")
    assert await ledger.flush() == 1
    ledger.record(_ctx(0), 0.01, "up", "v")  # a duplicate request id: refused, set aside
    ledger.record(_ctx(7), 0.01, "up", "v")
    assert await ledger.flush() == 1
    assert _value(m, "kaiyuan_store_rows_set_aside_total", "spend_ledger") == 2
    assert "req-7" in _ledger_rows(engine)


async def test_a_database_that_is_down_keeps_every_row_and_the_ledger_fails_closed(tmp_path: Path) -> None:
    engine = open_store(f"sqlite:///{tmp_path}/ok.db")
    m = Metrics()
    ledger = SpendLedger(engine, 60, m.store)
    ledger.check()  # healthy, empty: admits
    down = make_engine(f"sqlite:///{tmp_path}")  # a directory: "unable to open database file"
    ledger.engine = down
    for i in range(3):
        ledger.record(_ctx(i), 0.01, "up", "v")
    assert await ledger.flush() == 0
    assert ledger.writer.pending == 3 and not ledger.writer.healthy
    with pytest.raises(GatewayError) as e:
        ledger.check()
    assert e.value.kind is ErrorKind.STORE_UNAVAILABLE and e.value.status == 503
    assert e.value.headers["Retry-After"].isdigit()
    assert _value(m, "kaiyuan_store_rows_set_aside_total", "spend_ledger") == 0
    ledger.engine = engine  # back up: everything is written, in order, and new requests are admitted
    assert await ledger.flush() == 3
    assert _ledger_rows(engine) == ["req-0", "req-1", "req-2"]
    ledger.check()


async def test_a_full_money_queue_holds_every_row_and_refuses_new_work(tmp_path: Path) -> None:
    m = Metrics()
    ledger = SpendLedger(make_engine(f"sqlite:///{tmp_path}"), 60, m.store, max_queue=2)
    for i in range(4):  # requests already admitted still record their spend: never dropped
        ledger.record(_ctx(i), 0.01, "up", "v")
    assert ledger.writer.pending == 4
    assert _value(m, "kaiyuan_store_rows_dropped_total", "spend_ledger") == 0
    with pytest.raises(GatewayError):
        ledger.check()


async def test_the_drop_policy_counts_what_it_drops_and_close_writes_the_rest(tmp_path: Path) -> None:
    m = Metrics().store
    written: list[int] = []
    w: BatchWriter[int] = BatchWriter(WriterSpec("t", 3, 2, 60, "drop"), written.extend, m)
    assert [w.put(i) for i in range(5)] == [True, True, True, False, False]
    assert m.dropped.labels("t")._value.get() == 2
    w.start()
    await w.close()
    assert written == [0, 1, 2] and w.pending == 0


async def test_a_row_failing_as_unavailable_while_the_next_succeeds_is_set_aside() -> None:
    """No error class can wedge the queue: a row whose write always fails with a 'database down'
    error is set aside once a row behind it is written (the database is evidently up)."""
    m = Metrics().store
    written: list[int] = []

    def write(rows: list[int]) -> None:
        if 13 in rows:
            raise OperationalError("INSERT", {}, Exception("server closed the connection unexpectedly"))
        written.extend(rows)

    w: BatchWriter[int] = BatchWriter(WriterSpec("t", 100, 10, 60, "hold"), write, m)
    w.put(13)
    assert await w.flush() == 0 and w.pending == 1 and not w.healthy  # alone: cannot tell, kept
    for i in range(3):
        w.put(i)
    assert await w.flush() == 3
    assert written == [0, 1, 2] and w.pending == 0 and w.healthy
    assert m.set_aside.labels("t")._value.get() == 1


async def test_spent_since_adds_the_rows_not_written_yet(tmp_path: Path) -> None:
    engine = open_store(f"sqlite:///{tmp_path}/s.db")
    ledger = SpendLedger(engine, 60, Metrics().store)
    ledger.record(_ctx(0), 0.25, "up", "v")
    assert await ledger.flush() == 1
    ledger.record(_ctx(1), 0.5, "up", "v")
    ledger.record(_ctx(2, key="other"), 4.0, "up", "v")
    assert await ledger.spent_since("key", "k1", 0.0) == pytest.approx(0.75)
    with engine.connect() as c:
        assert c.execute(select(func.count()).select_from(spend_ledger)).scalar() == 1


@pytest.mark.parametrize("overflow", ["drop", "hold"])
async def test_a_full_batch_wakes_the_writer_and_the_rest_waits_for_the_next_one(overflow: str) -> None:
    """Rows that arrive while a full batch is written are not written at once in a tiny batch of
    their own: they wait for the next full batch or the interval (flush() still writes them all).
    Money (``hold``: the spend ledger) is the exception: it is written as soon as it can be."""
    import asyncio

    batches: list[int] = []
    gate, started = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def write(rows: list[int]) -> None:
        batches.append(len(rows))
        loop.call_soon_threadsafe(started.set)
        asyncio.run_coroutine_threadsafe(_wait(gate), loop).result(5)  # hold the first batch until told

    async def _wait(e: asyncio.Event) -> None:
        await e.wait()

    w: BatchWriter[int] = BatchWriter(WriterSpec("t", 100, 4, 3600.0, overflow), write, Metrics().store)  # type: ignore[arg-type]
    w.start()
    for i in range(4):
        w.put(i)
    await asyncio.wait_for(started.wait(), 5)
    for i in range(3):  # arrive while the first batch is being written
        w.put(10 + i)
    gate.set()
    for _ in range(20):
        await asyncio.sleep(0.01)
    if overflow == "hold":  # the 3 rows went out right behind the full batch
        assert batches == [4, 3] and w.pending == 0
        await w.close()
        return
    assert batches == [4] and w.pending == 3  # no batch of 3 right behind the full one
    w.put(13)  # a full batch again: written
    for _ in range(100):
        if w.pending == 0:
            break
        await asyncio.sleep(0.01)
    assert batches == [4, 4] and w.pending == 0
    w.put(99)
    assert await w.flush() == 1 and batches == [4, 4, 1]  # an explicit flush writes everything
    await w.close()
