"""Appending rows in bulk: the batch writers' one insert, fast on SQLite.

The request log and the spend ledger are written from a thread that shares the GIL with the event
loop. SQLAlchemy's ``insert()`` with a list of dicts processes every parameter in Python, and
``executemany`` steps SQLite once per row, releasing and re-taking the GIL each time, so the loop
and the writer hand the GIL back and forth (a futex call per request, seen with ``strace -c``).
On SQLite, complete rows go in as multi-row ``INSERT ... VALUES (...), (...)`` statements, as many
rows per statement as SQLite's parameter limit allows: one step per statement, ~20% less CPU per
row than ``executemany`` in a micro-benchmark. Anything else (PostgreSQL, rows that leave out a
column that has a Python-side default, rows with different keys) goes through SQLAlchemy.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import lru_cache
from itertools import chain
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection, Table

SQLITE_MAX_PARAMS = 32766  # SQLITE_MAX_VARIABLE_NUMBER since SQLite 3.32
# Binding a statement's parameters holds the GIL (only SQLite's step lets it go): 16 rows of the
# request log are ~400 parameters, a short hold that the event loop waits at most.
ROWS_PER_STATEMENT = 16
# The writer thread shares the event loop's core: a 500-row batch written in one go kept the loop
# off the CPU for ~5 ms and showed in the p99 of requests at low load (a stream's p99 at c=1 went
# from ~1.2 to ~3.7 ms; with 16-row statements and this pause, ~1.8-2.1 ms). A short sleep between
# statements gives the core back in between.
PAUSE_S = 0.0005


def insert_rows(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` into ``table`` in the connection's transaction."""
    if not rows:
        return
    cols = tuple(rows[0])
    if conn.dialect.name == "sqlite" and _plain(table, cols) and all(len(r) == len(cols) for r in rows):
        get = itemgetter(*cols) if len(cols) > 1 else (lambda r: (r[cols[0]],))
        try:
            values = [get(r) for r in rows]
        except KeyError:  # rows with different keys: let SQLAlchemy sort them out
            pass
        else:
            _sqlite_statements(conn, table.name, cols, values)
            return
    conn.execute(table.insert(), rows)


def insert_tuples(conn: Connection, table: Table, cols: tuple[str, ...], rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert ``rows``, each a tuple of ``cols`` in that order, into ``table`` (a row kept as a tuple
    from the start costs no dict to build on the event loop, and no lookup per column to write)."""
    if not rows:
        return
    if conn.dialect.name == "sqlite" and _plain(table, cols):
        _sqlite_statements(conn, table.name, cols, rows)
    else:
        conn.execute(table.insert(), [dict(zip(cols, r, strict=True)) for r in rows])


def _sqlite_statements(conn: Connection, table: str, cols: tuple[str, ...], values: Sequence[tuple[Any, ...]]) -> None:
    per = max(min(SQLITE_MAX_PARAMS // len(cols), ROWS_PER_STATEMENT), 1)
    for i in range(0, len(values), per):
        if i:
            time.sleep(PAUSE_S)  # let the event loop have the core between statements
        part = values[i:i + per]
        # chain: the parameters flattened in C (a generator expression ran ~300 instructions a value)
        conn.exec_driver_sql(_statement(table, cols, len(part)), tuple(chain.from_iterable(part)))


def _plain(table: Table, cols: tuple[str, ...]) -> bool:
    """The columns are the table's, and every column left out has no Python-side default (which
    SQLAlchemy would fill in and a raw statement would not)."""
    names = {c.name for c in table.columns}
    if not names.issuperset(cols):
        return False
    return all(c.default is None for c in table.columns if c.name not in cols)


@lru_cache(maxsize=16)  # full batches share one; a statement for 500 rows is ~40 KB
def _statement(table: str, cols: tuple[str, ...], n_rows: int) -> str:
    names = ", ".join(f'"{c}"' for c in cols)
    one = "(" + ", ".join("?" * len(cols)) + ")"
    return f'INSERT INTO "{table}" ({names}) VALUES ' + ", ".join([one] * n_rows)
