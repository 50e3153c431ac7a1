"""One bounded batch writer for every table the gateway appends to off the request path: the
request log, the spend ledger and trial rows.

Why one: four hand-written writers each had their own answer to "the queue is full", "the
database is down" and "the database refuses a row", and two of them were wrong (unbounded; or one
row the database refused was retried forever and every row behind it went unrecorded).

The rules, written once here:

- **Bounded queue, stated overflow.** ``overflow="drop"`` (the request log, trial results): a row
  that finds the queue full is dropped, counted in ``kaiyuan_store_rows_dropped{writer}`` and
  logged. ``overflow="hold"`` (money: the spend ledger, trial spend): a row is never dropped;
  instead :attr:`BatchWriter.full` turns true at ``max_queue`` and the caller refuses new work
  (the guard answers 503 before reserving), so the queue holds at most ``max_queue`` plus the
  requests already in flight.
- **Batches by size and interval**: a background task writes every ``flush_interval_s`` whatever is
  queued, and in between writes full batches as soon as ``batch_size`` rows are queued (the rows
  beyond a full batch wait for the next one, so a busy gateway writes big batches, not a stream of
  tiny ones; a ``hold`` writer, the money, writes whatever is queued each time); :meth:`flush` and
  :meth:`close` write everything.
- **A bad row never blocks the rows behind it.** When a batch fails, its rows are written one by
  one. A row the database refuses (a value out of range, a duplicate key, a string it cannot
  store) is set aside: logged at ERROR with its content and the error, counted in
  ``kaiyuan_store_rows_set_aside{writer}``, and removed from the queue. A row that fails with a
  "database unavailable" error while the next row succeeds, and again on three more tries, is set
  aside too, so no error class can wedge the queue.
- **A database that is down loses nothing**: the rows stay queued (in order) and are retried every
  interval. A crash loses what is queued (at most one interval's rows, unless the database was
  already down).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from kaiyuan.store.boundary import unavailable

log = logging.getLogger("kaiyuan.store.writer")
# Every writer's batches go through one thread: the database takes one writer at a time anyway
# (SQLite locks the file), and each extra thread that allocates gets its own glibc malloc arena,
# which the 10-minute soak saw as resident memory creeping up (bench/RESULTS.md, "Soak").
WRITER_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kaiyuan-writer")
R = TypeVar("R")
LOG_EVERY_S = 10.0
RETRIES = 3  # a suspect row's extra tries (in the writer's thread) before it is set aside
RETRY_PAUSE_S = 0.2  # at most one "queue full" / "database down" line per writer this often


@dataclass(frozen=True, slots=True)
class WriterSpec:
    name: str  # the metric label and log name: request_log, spend_ledger, trial_result, trial_spend
    max_queue: int
    batch_size: int
    flush_interval_s: float
    overflow: Literal["drop", "hold"]


class WriterMetrics:
    """The writers' metrics, one set per registry (labelled by writer)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.written = Counter("kaiyuan_store_rows_written", "Rows written by the batch writers", ["writer"], registry=r)
        self.dropped = Counter(
            "kaiyuan_store_rows_dropped", "Rows dropped because a writer's queue was full (overflow=drop only)",
            ["writer"], registry=r,
        )
        self.set_aside = Counter(
            "kaiyuan_store_rows_set_aside", "Rows the database refused, logged with their error and skipped",
            ["writer"], registry=r,
        )
        self.failures = Counter(
            "kaiyuan_store_write_failures", "Flushes that found the database unavailable (rows kept)", ["writer"], registry=r,
        )
        self.queued = Gauge("kaiyuan_store_rows_queued", "Rows waiting in a writer's queue", ["writer"], registry=r)


class BatchWriter(Generic[R]):
    """Queue rows now, write them in batches later. ``write`` is blocking (run in a thread) and
    must write all its rows or raise; ``describe`` renders a row for the set-aside log line."""

    def __init__(self, spec: WriterSpec, write: Callable[[list[R]], None], metrics: WriterMetrics,
                 describe: Callable[[R], str] = repr) -> None:
        self.spec = spec
        self._write = write
        self._describe = describe
        self._queue: deque[R] = deque()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._last_log = 0.0
        self.healthy = True  # False from a flush that found the database unavailable until one that wrote
        self.queued = 0  # rows ever queued: a row's number is the count before it (see ``done``)
        self.done = 0  # rows ever taken off the queue (written or set aside), in queue order
        self.m_written = metrics.written.labels(spec.name)
        self.m_dropped = metrics.dropped.labels(spec.name)
        self.m_set_aside = metrics.set_aside.labels(spec.name)
        self.m_failures = metrics.failures.labels(spec.name)
        metrics.queued.labels(spec.name).set_function(lambda: len(self._queue))

    # -- the request path: no I/O ------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return len(self._queue)

    def rows(self) -> list[R]:
        """A copy of the queued rows (for a reader that must count what is not written yet)."""
        return list(self._queue)

    def last(self) -> R | None:
        """The row queued last, if it is still queued."""
        return self._queue[-1] if self._queue else None

    @property
    def full(self) -> bool:
        """The queue is at its bound: a ``hold`` writer's caller must refuse new work now."""
        return len(self._queue) >= self.spec.max_queue

    def put(self, row: R) -> bool:
        """Queue a row; False when it was dropped (``overflow="drop"`` and the queue is full)."""
        if self.full and self.spec.overflow == "drop":
            self.m_dropped.inc()
            self._log_sometimes("%s: queue full (%d rows), rows are being dropped", self.spec.name, len(self._queue))
            return False
        self._queue.append(row)
        self.queued += 1
        if len(self._queue) >= self.spec.batch_size:
            self._wake.set()
        return True

    # -- the background task -------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None and not self._closing:
            self._task = asyncio.create_task(self._run(), name=f"kaiyuan-writer-{self.spec.name}")

    async def _run(self) -> None:
        while not self._closing:
            interval = False
            try:
                await asyncio.wait_for(self._wake.wait(), self.spec.flush_interval_s)
            except TimeoutError:
                interval = True
            self._wake.clear()
            try:
                # Woken by a full batch: write full batches only. The rows that arrive while one is
                # written wait for the next full batch or the interval; writing them at once made the
                # writer run back to back in batches of a few rows, each paying a thread hop, a
                # transaction and GIL hand-overs (about three times the CPU per row under load).
                # Money ("hold", the spend ledger) is still written as soon as it can be: the sooner
                # a row is in the ledger, the sooner a replica's book of rows a re-seeded budget
                # counter may lack is empty again (accounting.budget_seeds; correctness does not
                # depend on it).
                await self.flush(whole=interval or self._closing or self.spec.overflow == "hold")
            except Exception:  # a bug must not stop the writer for good
                log.exception("%s: flush failed unexpectedly; rows kept, retrying", self.spec.name)

    async def close(self) -> None:
        """Stop the task and write what is queued (a database that is down keeps it: logged)."""
        self._closing = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await task
            except Exception:  # pragma: no cover - the loop catches its own errors
                pass
        await self.flush()
        if self._queue:
            log.error("%s: %d rows could not be written before shutdown and are lost", self.spec.name, len(self._queue))

    # -- writing -------------------------------------------------------------------------------
    async def flush(self, whole: bool = True) -> int:
        """Write everything queued now (``whole=False``: only full batches); returns the rows
        written. One flush at a time."""
        async with self._lock:
            written = 0
            q = self._queue
            while q and (whole or len(q) >= self.spec.batch_size):
                batch = [q[i] for i in range(min(len(q), self.spec.batch_size))]
                try:
                    await asyncio.get_running_loop().run_in_executor(WRITER_THREAD, self._write, batch)
                    done, ok = len(batch), len(batch)
                except Exception:
                    done, ok = await asyncio.get_running_loop().run_in_executor(WRITER_THREAD, self._write_each, batch)
                for _ in range(done):
                    q.popleft()
                self.done += done
                if done:
                    self.healthy = True
                written += ok
                self.m_written.inc(ok)
                if done < len(batch):  # the database is unavailable: keep the rest for the next flush
                    return written
            return written

    def _write_each(self, batch: list[R]) -> tuple[int, int]:
        """Write rows one by one, setting refused rows aside. Returns (rows done, rows written); rows
        after ``done`` stay queued because the database became unreachable."""
        written = 0
        suspect: tuple[int, R, BaseException] | None = None
        for i, row in enumerate(batch):
            try:
                self._write([row])
            except Exception as e:
                if not unavailable(e):
                    self._set_aside(row, e)
                elif suspect is None:
                    suspect = (i, row, e)  # the database, or this row? the next row tells
                else:
                    self._down(e)
                    return suspect[0], written  # two in a row: the database is down
                continue
            written += 1
            if suspect is not None:  # the database is up: try the suspect again before blaming it
                if self._retry(suspect[1]):
                    written += 1
                else:
                    self._set_aside(suspect[1], suspect[2])
                suspect = None
        if suspect is not None:  # the last row failed as "unavailable" with nothing after it to tell
            self._down(suspect[2])
            return suspect[0], written
        return len(batch), written

    def _retry(self, row: R) -> bool:
        """A row that failed as "unavailable" while the row after it was written: the database may
        just have come back (a fresh connection refused during its start). Three more tries."""
        for _ in range(RETRIES):
            time.sleep(RETRY_PAUSE_S)
            try:
                self._write([row])
                return True
            except Exception as e:
                if not unavailable(e):
                    return False
        return False

    def _set_aside(self, row: R, e: BaseException) -> None:
        self.m_set_aside.inc()
        log.error("%s: row set aside, the database refused it: %s; row: %s",
                  self.spec.name, getattr(e, "orig", None) or e, self._describe(row)[:4000])

    def _down(self, e: BaseException) -> None:
        self.healthy = False
        self.m_failures.inc()
        self._log_sometimes("%s: database unavailable (%s); %d rows kept, retrying every %.1f s",
                            self.spec.name, getattr(e, "orig", None) or e, len(self._queue), self.spec.flush_interval_s)

    def _log_sometimes(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log.error(msg, *args)
