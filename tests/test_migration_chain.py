"""The Alembic chain is one ordered line, the migrated schema equals schema.py (no drift), and
databases made at every head of the old, out-of-order chain (0001 -> 0004 -> 0002) upgrade.

On SQLite, and on PostgreSQL when KAIYUAN_TEST_POSTGRES_URL is set.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, select, text

from kaiyuan.store.db import alembic_config, current_revision, make_engine, upgrade
from kaiyuan.store.schema import metadata, request_log, trial_def
from tests.test_migrations_keys import drop_pg_database, fresh_pg_database


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        yield make_engine(f"sqlite:///{tmp_path}/m.db")
        return
    base = os.environ.get("KAIYUAN_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("KAIYUAN_TEST_POSTGRES_URL is not set (scripts/test.sh starts PostgreSQL when it is installed)")
    url, eng = fresh_pg_database(base)
    yield eng
    eng.dispose()
    drop_pg_database(base, url)


def _drift(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), metadata))


def test_the_chain_is_one_ordered_line() -> None:
    scripts = ScriptDirectory.from_config(alembic_config("sqlite://"))
    heads = scripts.get_heads()
    assert len(heads) == 1, f"migrations must form one line; heads: {heads} (set down_revision to the current head)"
    order = [s.revision for s in reversed(list(scripts.walk_revisions()))]
    assert order == sorted(set(order)), f"revisions must run in the order of their numbers: {order}"


def test_migrated_schema_matches_schema_py(engine: Engine) -> None:
    upgrade(engine)
    assert _drift(engine) == []


@pytest.mark.parametrize(
    ("old_head", "made_by"),
    [("0001", "0001"), ("0004", "0002"), ("0002", "0003")],  # old id, and the ordered revision with its schema
)
def test_databases_made_at_each_old_head_upgrade(engine: Engine, old_head: str, made_by: str) -> None:
    upgrade(engine, made_by)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": old_head})
        conn.execute(request_log.insert(), [{"id": "kept", "ts": 1.0, "dialect": "openai", "endpoint": "chat",
                                            "stream": False, "status": 200, "attempts": 1, "cancelled": False}])
        if inspect(conn).has_table("trial_def"):
            conn.execute(trial_def.insert(), [{"name": "t", "definition": "{}", "created": 1.0, "status": "active"}])
    upgrade(engine)
    assert current_revision(engine) == ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert _drift(engine) == []
    with engine.connect() as conn:
        assert conn.execute(select(request_log.c.id)).scalars().all() == ["kept"]
        if made_by != "0001":
            assert conn.execute(select(trial_def.c.name)).scalars().all() == ["t"]
    upgrade(engine)  # again: nothing to do
