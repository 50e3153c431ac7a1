"""The hourly usage rollup: the request log summed per (hour, model, deployment, team, key, status).

Pages read ``usage_hourly`` (a few thousand rows for a month) instead of the log (a million).
A background task, off the request path, catches up every ``console.rollup_interval_s``.

Each pass sums only the log rows not summed before and adds them to the stored rows of their
hours, so its cost follows the traffic since the last pass, not the size of the hour (a pass used
to re-read the whole open hour: 1.8 M rows by the end of an hour at 500 req/s, bursts of CPU and
allocations beside the serving loop; bench/RESULTS.md, "Soak, round 5"). What "not summed before"
means is a cursor in *write order*, not time: rows from many replicas arrive late and out of order.

* SQLite: the row's ``rowid``. SQLite has one writer at a time, so the rows a reader sees are always
  every row up to some rowid. The cursor also keeps the request id of the last summed row: if that
  rowid now holds another row (a ``VACUUM`` renumbers rowids after deletes), the rollup is rebuilt.
* PostgreSQL: ``request_log.writer_txid``, the id of the transaction that wrote the row (a column
  default, migration 0007), with the request id as tie-breaker. A sequence would not do: numbers
  are taken at insert and committed in another order, so a reader could pass a number whose row
  commits later. A pass reads only rows whose transaction is older than the oldest one still running
  (``pg_snapshot_xmin``): every such transaction has ended, so no row below the cursor can appear
  later. A long-open write transaction elsewhere in the database delays the rollup; it loses nothing.

A chunk of rows is summed outside any write lock, then added in one short transaction that first
moves the cursor from where the chunk started; if another pass (a replica, the CLI) moved it
meanwhile, nothing is written. Money is summed in integer nano-dollars (each row's cost rounded
once), so a rollup built in any number of passes equals a full re-sum exactly. :func:`rebuild`
(``kaiyuan console-rollup --rebuild``) drops the rollup and sums the whole log again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    delete,
    insert,
    literal_column,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.sql.elements import ColumnElement

from kaiyuan import background
from kaiyuan.console import histogram
from kaiyuan.limits.counters import NANO
from kaiyuan.store.schema import request_log, rollup_cursor, usage_hourly

log = logging.getLogger("kaiyuan.console.rollup")

HOUR = 3600
CURSOR_NAME = "request_log"
# Rows summed per transaction: a first pass over a big log goes in steps, each committed.
CHUNK_ROWS = 20_000
# Rows read per fetch. Small: a pass runs in a thread beside a serving event loop, and every row
# fetched at once is a burst of Python objects that the allocator keeps arenas for afterwards.
YIELD_ROWS = 1000
_COLS = (request_log.c.ts, request_log.c.model, request_log.c.deployment, request_log.c.team_id, request_log.c.key_id,
         request_log.c.status, request_log.c.prompt_tokens, request_log.c.completion_tokens, request_log.c.cached_tokens,
         request_log.c.cost_usd, request_log.c.latency_ms, request_log.c.ttft_ms)
_DIMS = ("hour", "model", "deployment", "team_id", "key_id", "status")
Key = tuple[int, str, str, str, str, int]  # hour, model, deployment, team, key, status


@dataclass(frozen=True)
class Cursor:
    """The last summed row: its write-order number (SQLite rowid / PostgreSQL writer_txid) and id."""

    seq: int
    row_id: str


START = Cursor(-1, "")


@dataclass
class _Acc:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_nano: int = 0
    cost_unknown: int = 0
    priced: list[int] = field(default_factory=lambda: [0, 0, 0])  # prompt, completion, cached tokens of priced requests
    latency: histogram.Hist = field(default_factory=dict)
    ttft: histogram.Hist = field(default_factory=dict)

    def add_row(self, r: Any) -> None:
        """One log row (the columns of ``_COLS``, after the cursor's two)."""
        status, pt, ct, cached, cost = r[7], r[8] or 0, r[9] or 0, r[10] or 0, r[11]
        self.requests += 1
        self.prompt_tokens += pt
        self.completion_tokens += ct
        self.cached_tokens += cached
        if cost is None:
            self.cost_unknown += status < 400
        else:
            self.cost_nano += round(cost * NANO)
            self.priced[0] += pt
            self.priced[1] += ct
            self.priced[2] += cached
        histogram.add(self.latency, r[12])
        histogram.add(self.ttft, r[13])

    def add_stored(self, row: Any) -> None:
        """A stored ``usage_hourly`` row, added to this one."""
        self.requests += row.requests
        self.prompt_tokens += row.prompt_tokens
        self.completion_tokens += row.completion_tokens
        self.cached_tokens += row.cached_tokens
        self.cost_nano += row.cost_nano
        self.cost_unknown += row.cost_unknown
        self.priced[0] += row.priced_prompt_tokens
        self.priced[1] += row.priced_completion_tokens
        self.priced[2] += row.priced_cached_tokens
        histogram.merge_json(self.latency, row.latency_hist)
        histogram.merge_json(self.ttft, row.ttft_hist)

    def values(self) -> dict[str, Any]:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "cached_tokens": self.cached_tokens, "cost_nano": self.cost_nano, "cost_usd": self.cost_nano / NANO,
                "cost_unknown": self.cost_unknown, "priced_prompt_tokens": self.priced[0],
                "priced_completion_tokens": self.priced[1], "priced_cached_tokens": self.priced[2],
                "latency_hist": histogram.dumps(self.latency), "ttft_hist": histogram.dumps(self.ttft)}


@dataclass
class _Chunk:
    start: Cursor
    end: Cursor
    rows: int = 0
    groups: dict[Key, _Acc] = field(default_factory=dict)


class _Reset(Exception):
    """The stored cursor no longer describes the log (rowids renumbered, another database cluster)."""


def _seq_col(conn: Connection) -> ColumnElement[Any]:
    if conn.dialect.name == "sqlite":
        return literal_column("request_log.rowid")
    return request_log.c.writer_txid


def _read_cursor(conn: Connection) -> Cursor:
    row = conn.execute(select(rollup_cursor.c.after_seq, rollup_cursor.c.after_id).where(rollup_cursor.c.name == CURSOR_NAME)).first()
    return START if row is None else Cursor(int(row[0]), row[1])


def _check(conn: Connection, cur: Cursor) -> int | None:
    """Raise _Reset if ``cur`` no longer fits the log; on PostgreSQL return the bound every row to
    sum stays under (the oldest running transaction), on SQLite None (no bound needed)."""
    if conn.dialect.name == "sqlite":
        if cur.seq >= 0 and conn.execute(text("SELECT id FROM request_log WHERE rowid = :s"), {"s": cur.seq}).scalar() != cur.row_id:
            raise _Reset(f"row {cur.seq} of the request log is no longer {cur.row_id!r} (renumbered by a VACUUM, or deleted)")
        return None
    bound = int(conn.execute(text("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")).scalar_one())
    if bound <= cur.seq:
        raise _Reset(f"the database's transaction ids ({bound}) are behind the rollup's cursor ({cur.seq}): restored elsewhere?")
    return bound


def _read_chunk(engine: Engine, limit: int) -> _Chunk:
    """Sum up to ``limit`` rows after the stored cursor (no write lock held)."""
    with engine.connect() as conn:
        start = _read_cursor(conn)
        bound = _check(conn, start)
        seq = _seq_col(conn)
        q = select(seq, request_log.c.id, *_COLS)
        if bound is None:
            q = q.where(seq > start.seq).order_by(seq)
        else:
            q = q.where(tuple_(seq, request_log.c.id) > tuple_(start.seq, start.row_id), seq < bound).order_by(seq, request_log.c.id)
        chunk = _Chunk(start, start)
        last = None
        for r in conn.execute(q.limit(limit), execution_options={"yield_per": YIELD_ROWS}):
            k = (int(r[2] // HOUR), r[3] or "", r[4] or "", r[5] or "", r[6] or "", int(r[7]))
            a = chunk.groups.get(k)
            if a is None:
                a = chunk.groups[k] = _Acc()
            a.add_row(r)
            chunk.rows += 1
            last = r
        if last is not None:
            chunk.end = Cursor(int(last[0]), last[1])
    return chunk


def _move_cursor(conn: Connection, frm: Cursor, to: Cursor) -> bool:
    """Move the stored cursor ``frm`` -> ``to``; False if it is no longer at ``frm`` (another pass)."""
    c = rollup_cursor.c
    moved = conn.execute(update(rollup_cursor).where(c.name == CURSOR_NAME, c.after_seq == frm.seq, c.after_id == frm.row_id)
                         .values(after_seq=to.seq, after_id=to.row_id)).rowcount
    if moved == 1:
        return True
    if frm == START and conn.execute(select(c.name).where(c.name == CURSOR_NAME)).first() is None:
        _insert_cursor(conn, to)
        return True
    return False


def _insert_cursor(conn: Connection, at: Cursor) -> None:
    conn.execute(insert(rollup_cursor), [{"name": CURSOR_NAME, "after_seq": at.seq, "after_id": at.row_id}])


def _merge(conn: Connection, groups: dict[Key, _Acc]) -> None:
    """Add ``groups`` to the stored rows of their hours (in the caller's transaction)."""
    t = usage_hourly
    hours = sorted({k[0] for k in groups})
    stored = {tuple(getattr(r, d) for d in _DIMS): r for r in conn.execute(select(t).where(t.c.hour.in_(hours)))}
    new: list[dict[str, Any]] = []
    changed: list[dict[str, Any]] = []
    for k, acc in groups.items():
        old = stored.get(k)
        if old is not None:
            acc.add_stored(old)
        row = {**dict(zip(_DIMS, k, strict=True)), **acc.values()}
        (changed if old is not None else new).append(row)
    if changed:
        conn.execute(update(t).where(*(getattr(t.c, d) == bindparam("k_" + d) for d in _DIMS)),
                     [{("k_" + d if d in _DIMS else d): v for d, v in r.items()} for r in changed])
    if new:
        conn.execute(insert(t), new)


def _apply(engine: Engine, chunk: _Chunk) -> bool:
    with engine.begin() as conn:
        if not _move_cursor(conn, chunk.start, chunk.end):
            return False
        _merge(conn, chunk.groups)
    return True


def _reset(engine: Engine, expect: Cursor | None) -> None:
    """Drop the rollup and put the cursor at the start (only if it is still at ``expect``, when given)."""
    with engine.begin() as conn:
        if expect is not None and _read_cursor(conn) != expect:
            return
        conn.execute(delete(usage_hourly))
        c = rollup_cursor.c
        if conn.execute(update(rollup_cursor).where(c.name == CURSOR_NAME).values(after_seq=START.seq, after_id=START.row_id)).rowcount == 0:
            _insert_cursor(conn, START)


def catch_up(engine: Engine, chunk_rows: int = CHUNK_ROWS) -> int:
    """Sum every log row not summed yet into usage_hourly, a chunk per transaction. Returns rows
    summed by this call (0 when another pass got there first)."""
    summed = 0
    while True:
        try:
            chunk = _read_chunk(engine, chunk_rows)
        except _Reset as e:
            log.warning("console rollup: %s; rebuilding it from the whole log", e)
            with engine.connect() as conn:
                _reset(engine, _read_cursor(conn))
            continue
        if chunk.rows == 0 or not _apply(engine, chunk):
            return summed
        summed += chunk.rows
        if chunk.rows < chunk_rows:
            return summed


def rebuild(engine: Engine, chunk_rows: int = CHUNK_ROWS) -> int:
    """Drop the rollup and sum the whole log again (the repair path; pages show partial sums until
    it has caught up). Returns rows summed."""
    _reset(engine, None)
    return catch_up(engine, chunk_rows)


def stored(engine: Engine) -> list[dict[str, Any]]:
    """Every usage_hourly row, ordered by its key (for comparing two rollups)."""
    with engine.connect() as conn:
        rows = conn.execute(select(usage_hourly).order_by(*(getattr(usage_hourly.c, d) for d in _DIMS)))
        return [dict(r._mapping) for r in rows]


MAX_SHARE = 0.1  # of the wall clock that passes of the rollup may take


def next_wait(interval_s: float, took_s: float) -> float:
    """Seconds until the next pass: ``interval_s``, or longer when a pass is slow, so the rollup
    takes at most MAX_SHARE of the time. A pass sums the rows written since the last one (about
    2.5 s of CPU per million rows), so it is slow only after a long pause or on a first start over
    a big log."""
    return max(interval_s, took_s * (1 - MAX_SHARE) / MAX_SHARE)


class RollupTask:
    """Runs :func:`catch_up` in a thread every ``interval_s``; :meth:`refresh` for a page that wants fresh numbers."""

    def __init__(self, engine: Engine, interval_s: float) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.last_run = 0.0
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="kaiyuan-console-rollup")

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.refresh(max_age_s=0)
            except Exception:  # the next pass retries; a page still shows the last rollup
                log.exception("console rollup failed")
            await asyncio.sleep(next_wait(self.interval_s, time.monotonic() - started))

    async def refresh(self, max_age_s: float = 5.0) -> None:
        """Catch up unless another pass finished less than ``max_age_s`` ago (one pass at a time)."""
        async with self._lock:
            if time.time() - self.last_run < max_age_s:
                return
            await asyncio.to_thread(catch_up, self.engine)
            self.last_run = time.time()

    async def close(self) -> None:
        task, self._task = self._task, None
        await background.stop(task)
