"""store.fast_insert: the batch writers' bulk insert (multi-row statements on SQLite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, select
from sqlalchemy.exc import IntegrityError

from kaiyuan.store import fast_insert
from kaiyuan.store.fast_insert import insert_rows

md = MetaData()
things = Table("things", md, Column("id", String(16), primary_key=True), Column("n", Integer, nullable=True),
               Column("kind", String(8), nullable=False, default="plain"))


@pytest.fixture
def engine(tmp_path: Path) -> Any:
    eng = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    md.create_all(eng)
    return eng


def _all(engine: Any) -> list[tuple[Any, ...]]:
    with engine.connect() as c:
        return [tuple(r) for r in c.execute(select(things).order_by(things.c.id))]


def test_rows_beyond_one_statement_are_split_and_all_written(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_insert, "SQLITE_MAX_PARAMS", 7)  # 2 rows of 3 columns per statement
    rows = [{"id": f"r{i:02}", "n": i, "kind": "k"} for i in range(5)]
    with engine.begin() as c:
        insert_rows(c, things, rows)
    assert _all(engine) == [(f"r{i:02}", i, "k") for i in range(5)]


def test_a_column_left_out_gets_its_python_default(engine: Any) -> None:
    with engine.begin() as c:
        insert_rows(c, things, [{"id": "a", "n": 1}, {"id": "b", "n": None}])  # "kind" has a default: SQLAlchemy path
    assert _all(engine) == [("a", 1, "plain"), ("b", None, "plain")]


def test_keys_in_another_order_are_matched_by_name(engine: Any) -> None:
    with engine.begin() as c:
        insert_rows(c, things, [{"id": "c", "n": 3, "kind": "x"}, {"kind": "y", "n": 4, "id": "d"}])
    assert _all(engine) == [("c", 3, "x"), ("d", 4, "y")]


def test_a_duplicate_fails_the_whole_statement_so_the_writer_can_set_it_aside(engine: Any) -> None:
    with pytest.raises(IntegrityError), engine.begin() as c:
        insert_rows(c, things, [{"id": "a", "n": 1, "kind": "x"}, {"id": "a", "n": 2, "kind": "x"}])
    assert _all(engine) == []  # nothing half-written: the batch writer retries row by row


def test_nothing_to_write_is_a_no_op(engine: Any) -> None:
    with engine.begin() as c:
        insert_rows(c, things, [])
    assert _all(engine) == []


def test_nulls_and_booleans_are_bound_as_before_through_the_registered_adapters(tmp_path: Path) -> None:
    """make_engine registers C adapters for None and bool (the sqlite3 module's own search for one
    was most of a row's binding cost): the stored values are exactly what sqlite3 stored without
    them, NULL and the integers 1 and 0."""
    import sqlite3

    from kaiyuan.store.db import make_engine

    eng = make_engine(f"sqlite:///{tmp_path / 'a.db'}")
    assert (type(None), sqlite3.PrepareProtocol) in sqlite3.adapters and (bool, sqlite3.PrepareProtocol) in sqlite3.adapters
    flags = Table("flags", MetaData(), Column("id", String(8), primary_key=True), Column("a", Integer, nullable=True),
                  Column("b", Integer, nullable=True), Column("c", Integer, nullable=True))
    flags.metadata.create_all(eng)
    with eng.begin() as c:
        insert_rows(c, flags, [{"id": "x", "a": None, "b": True, "c": False}, {"id": "y", "a": 7, "b": None, "c": None}])
    with eng.connect() as c:
        got = c.exec_driver_sql("SELECT id, a, typeof(a), b, typeof(b), c FROM flags ORDER BY id").all()
    assert [tuple(r) for r in got] == [("x", None, "null", 1, "integer", 0), ("y", 7, "integer", None, "null", None)]
