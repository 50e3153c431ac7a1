"""Migrations run forward safely: a database made at revision 0001, with rows, upgrades to head
without losing anything (SQLite always; PostgreSQL when KAIYUAN_TEST_POSTGRES_URL is set)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, insert, inspect, select, text

from kaiyuan.store.db import current_revision, make_engine, normalise_url, upgrade
from kaiyuan.store.schema import request_log

PG_URL = os.environ.get("KAIYUAN_TEST_POSTGRES_URL")


def _row(i: int) -> dict[str, object]:
    return {
        "id": f"req_{i}", "ts": 1_700_000_000.0 + i, "key_id": f"key_{i % 3}", "team_id": None, "dialect": "openai",
        "endpoint": "chat", "model": "m", "deployment": "d", "stream": bool(i % 2), "status": 200, "prompt_tokens": i,
        "completion_tokens": 2 * i, "cached_tokens": None, "reasoning_tokens": None, "cost_usd": i / 1000,
        "latency_ms": 1.5, "ttft_ms": None, "attempts": 1, "attempt_log": None, "policy": None, "trial": None,
        "cancelled": False, "error": None, "request_body": None, "response_body": None,
    }


def _check_upgrade(engine: Engine) -> None:
    cols = [request_log.c[k] for k in _row(0)]  # the columns of revision 0001 (later ones add writer_txid)
    upgrade(engine, "0001")
    assert current_revision(engine) == "0001"
    with engine.begin() as conn:
        conn.execute(insert(request_log), [_row(i) for i in range(50)])
        before = [dict(r) for r in conn.execute(select(*cols).order_by(request_log.c.id)).mappings()]
    upgrade(engine)
    assert current_revision(engine) not in (None, "0001")
    names = set(inspect(engine).get_table_names())
    assert {"api_keys", "teams", "users", "budgets", "spend_ledger", "request_log"} <= names
    with engine.connect() as conn:
        after = [dict(r) for r in conn.execute(select(*cols).order_by(request_log.c.id)).mappings()]
    assert after == before
    upgrade(engine)  # again: nothing to do, nothing changes


def test_sqlite_upgrade_from_0001_keeps_rows(tmp_path: Path) -> None:
    _check_upgrade(make_engine(f"sqlite:///{tmp_path}/old.db"))


@pytest.fixture
def pg_engine() -> Iterator[Engine]:
    if not PG_URL:
        pytest.skip("set KAIYUAN_TEST_POSTGRES_URL (e.g. postgresql://postgres@127.0.0.1:5433/kaiyuan_test) to run PostgreSQL tests")
    url, engine = fresh_pg_database(PG_URL)
    yield engine
    engine.dispose()
    drop_pg_database(PG_URL, url)


def fresh_pg_database(base_url: str) -> tuple[str, Engine]:
    """A new, empty database next to the one in ``base_url`` (dropped by ``drop_pg_database``)."""
    name = f"kaiyuan_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(normalise_url(base_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = base_url.rsplit("/", 1)[0] + "/" + name
    return url, make_engine(url)


def drop_pg_database(base_url: str, url: str) -> None:
    name = url.rsplit("/", 1)[1]
    admin = create_engine(normalise_url(base_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_postgres_upgrade_from_0001_keeps_rows(pg_engine: Engine) -> None:
    _check_upgrade(pg_engine)
