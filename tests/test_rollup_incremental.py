"""The console rollup sums only rows not yet summed, and stays exactly a full re-sum of the log.

On SQLite and on the real PostgreSQL server the test services provide. Rows are written in
batches whose timestamps interleave across an hour boundary (replicas deliver late, out of time
order), with passes and a restart in between; the rollup must equal both a rebuild and sums
computed here from the rows themselves. On PostgreSQL a row whose transaction commits after a
later one's (a slow replica) must still be counted, once.
"""

from __future__ import annotations

import logging
import random
import uuid
from typing import Any

import pytest
from sqlalchemy import Engine, delete, insert, select, text, update

from kaiyuan.console import rollup
from kaiyuan.limits.counters import NANO
from kaiyuan.store.db import make_engine, open_store, upgrade
from kaiyuan.store.schema import request_log, rollup_cursor, usage_hourly
from tests.test_store import db_url  # noqa: F401  (the sqlite / postgres fixture)

H = 497_000  # an hour number; rows straddle the boundary H | H + 1
MODELS = ("qwen", "deepseek")


def _rows(rng: random.Random, n: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(n):
        cost = rng.choice([None, 0.1, 0.2, 1e-7 * rng.randint(1, 999), rng.random() / 1000])
        status = rng.choice([200, 200, 200, 429, 500])
        out.append({"id": uuid.uuid4().hex, "ts": (H + 1) * 3600 + rng.uniform(-900, 900), "dialect": "openai",
                    "endpoint": "chat", "model": rng.choice(MODELS), "team_id": rng.choice([None, "t1"]), "status": status,
                    "stream": False, "attempts": 1, "cancelled": False, "prompt_tokens": rng.choice([None, rng.randint(1, 5000)]),
                    "completion_tokens": rng.randint(0, 900), "cached_tokens": rng.choice([None, 0, 64]), "cost_usd": cost,
                    "latency_ms": rng.uniform(0.5, 9000), "ttft_ms": rng.choice([None, rng.uniform(0.5, 900)])})
    return out


def _add(engine: Engine, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as c:
        c.execute(insert(request_log), rows)


def _expected(rows: list[dict[str, Any]]) -> dict[tuple[int, str], tuple[int, int, int, int]]:
    """Per (hour, model), from the rows as written: requests, prompt tokens, completion tokens, nano-USD."""
    out: dict[tuple[int, str], tuple[int, int, int, int]] = {}
    for r in rows:
        k = (int(r["ts"] // 3600), r["model"])
        n, pt, ct, nano = out.get(k, (0, 0, 0, 0))
        out[k] = (n + 1, pt + (r["prompt_tokens"] or 0), ct + r["completion_tokens"],
                  nano + (0 if r["cost_usd"] is None else round(r["cost_usd"] * NANO)))
    return out


def _rolled(engine: Engine) -> dict[tuple[int, str], tuple[int, int, int, int]]:
    out: dict[tuple[int, str], tuple[int, int, int, int]] = {}
    for r in rollup.stored(engine):
        k = (r["hour"], r["model"])
        n, pt, ct, nano = out.get(k, (0, 0, 0, 0))
        out[k] = (n + r["requests"], pt + r["prompt_tokens"], ct + r["completion_tokens"], nano + r["cost_nano"])
        assert r["cost_usd"] == r["cost_nano"] / NANO
    return out


def test_passes_between_batches_equal_a_full_resum(db_url: str) -> None:  # noqa: F811
    engine = open_store(db_url)
    rng = random.Random(13)
    written: list[dict[str, Any]] = []
    for batch in range(6):
        rows = _rows(rng, rng.randint(30, 120))
        rng.shuffle(rows)  # timestamps out of order, on both sides of the hour boundary
        _add(engine, rows)
        written += rows
        if batch == 3:  # a restart: a new engine over the same database, the cursor read back
            engine.dispose()
            engine = open_store(db_url)
        assert rollup.catch_up(engine, chunk_rows=rng.choice([7, 50, 1000])) == len(rows)
    assert {h for h, _ in _expected(written)} == {H, H + 1}
    assert _rolled(engine) == _expected(written)
    incremental = rollup.stored(engine)
    assert rollup.rebuild(engine) == len(written)
    assert rollup.stored(engine) == incremental  # every column, histograms and money included
    assert rollup.catch_up(engine) == 0


def test_a_row_committed_after_a_later_one_is_counted_once(db_url: str) -> None:  # noqa: F811
    """A replica's batch that was written first but commits last: on PostgreSQL its transaction id
    is below the other's, so a cursor that ran past the other's rows would skip it for ever."""
    engine = open_store(db_url)
    rng = random.Random(5)
    first, slow, fast = _rows(rng, 20), _rows(rng, 15), _rows(rng, 10)
    _add(engine, first)
    rollup.catch_up(engine)
    conn = engine.connect()
    tx = conn.begin()
    conn.execute(insert(request_log), slow)  # open, not committed
    if engine.dialect.name == "postgresql":  # SQLite has one writer at a time: no second batch can commit meanwhile
        _add(engine, fast)
    else:
        fast = []
    rollup.catch_up(engine)
    assert sum(n for n, *_ in _rolled(engine).values()) == len(first)  # neither the open batch nor any after it
    tx.commit()
    conn.close()
    rollup.catch_up(engine)
    assert _rolled(engine) == _expected(first + slow + fast)
    incremental = rollup.stored(engine)
    rollup.rebuild(engine)
    assert rollup.stored(engine) == incremental


def test_a_cursor_that_no_longer_fits_the_log_rebuilds(db_url: str, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    """A cursor past anything the log can hold (SQLite: a rowid that now holds another row, after a
    VACUUM renumbered them; PostgreSQL: a database restored into a cluster with lower transaction
    ids) is not trusted: the rollup is summed again from the whole log."""
    engine = open_store(db_url)
    rows = _rows(random.Random(2), 40)
    _add(engine, rows)
    rollup.catch_up(engine)
    with engine.begin() as c:
        c.execute(update(rollup_cursor).values(after_seq=2**62))
    with caplog.at_level(logging.WARNING, logger="kaiyuan.console.rollup"):
        assert rollup.catch_up(engine) == 40
    assert "rebuilding" in caplog.text
    assert _rolled(engine) == _expected(rows)


def test_sqlite_rowids_renumbered_rebuild(tmp_path: Any) -> None:
    """SQLite may renumber the rowids of a table without an INTEGER PRIMARY KEY in a VACUUM after
    deletes (the documented licence; current versions mostly keep them): done here by hand."""
    url = f"sqlite:///{tmp_path}/v.db"
    engine = open_store(url)
    rng = random.Random(3)
    rows = _rows(rng, 60)
    _add(engine, rows)
    rollup.catch_up(engine)
    with engine.begin() as c:
        gone = [r[0] for r in c.execute(select(request_log.c.id).order_by(text("rowid")).limit(10))]
        c.execute(delete(request_log).where(request_log.c.id.in_(gone)))
        c.execute(text("UPDATE request_log SET rowid = rowid - 10"))  # renumbered from 1 again
    more = _rows(rng, 5)
    _add(engine, more)
    rollup.catch_up(engine)
    assert _rolled(engine) == _expected([r for r in rows if r["id"] not in gone] + more)


def test_the_migration_drops_the_old_rollup_and_the_first_pass_sums_everything(tmp_path: Any) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/m.db")
    upgrade(engine, "0006")
    rows = _rows(random.Random(4), 30)
    _add(engine, rows)
    with engine.begin() as c:  # what the old per-hour pass left
        c.execute(text("INSERT INTO rollup_hours (hour, rows) VALUES (:h, 30)"), {"h": H})
        c.execute(insert(usage_hourly), [{"hour": H, "model": "qwen", "deployment": "", "team_id": "", "key_id": "", "status": 200,
                                          "requests": 30, "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0,
                                          "cost_usd": 0.0, "cost_unknown": 0, "priced_prompt_tokens": 0,
                                          "priced_completion_tokens": 0, "priced_cached_tokens": 0, "latency_hist": "{}",
                                          "ttft_hist": "{}"}])
    upgrade(engine)
    assert rollup.stored(engine) == []
    assert rollup.catch_up(engine) == 30
    assert _rolled(engine) == _expected(rows)
