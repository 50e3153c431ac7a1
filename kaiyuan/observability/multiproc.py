"""Prometheus multiprocess mode without a file write on every increment.

Under ``kaiyuan serve --workers N`` every process writes its metric values to files in
``PROMETHEUS_MULTIPROC_DIR``, and ``/metrics`` on any worker sums the files. prometheus_client's
own value class writes the file (a lock, a pid check and a ``struct`` pack into an mmap) on every
``inc``/``observe``: ~2.7x the cost of an in-memory value, and a request makes a dozen of them, so
a worker spent ~25 µs a request more than a single process did. Here a value is a plain float in
memory; :func:`sync` writes the values that changed to the same files, in the same format, so
prometheus_client's ``MultiProcessCollector`` reads them unchanged. Each process syncs every
``SYNC_INTERVAL_S``, before it renders ``/metrics`` (its own values are then exact) and when it
stops. So a scrape sees the other processes' values up to ``SYNC_INTERVAL_S`` late, and a process
killed outright loses at most that much of its counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from typing import Any

from prometheus_client import values
from prometheus_client.mmap_dict import MmapedDict, mmap_key

ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"
SYNC_INTERVAL_S = 1.0

_lock = threading.Lock()
_files: dict[str, MmapedDict] = {}
_values: list[BufferedValue] = []


class BufferedValue:
    """A metric value in memory, written to this process's file by :func:`sync` (the interface of
    prometheus_client's value classes)."""

    _multiprocess = True

    def __init__(self, typ: str, metric_name: str, name: str, labelnames: Any, labelvalues: Any, help_text: str,
                 multiprocess_mode: str = "", **_kwargs: Any) -> None:
        prefix = f"{typ}_{multiprocess_mode}" if typ == "gauge" else typ
        with _lock:
            f = _files.get(prefix)
            if f is None:
                f = _files[prefix] = MmapedDict(os.path.join(os.environ[ENV_DIR], f"{prefix}_{os.getpid()}.db"))
            self._file = f
            self._key = mmap_key(metric_name, name, labelnames, labelvalues, help_text)
            self._value, self._timestamp = f.read_value(self._key)
            self._written = self._value
            _values.append(self)

    def inc(self, amount: float) -> None:
        with _lock:
            self._value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        with _lock:
            self._value = value
            self._timestamp = timestamp or 0.0

    def set_exemplar(self, _exemplar: Any) -> None:
        return  # not kept in multiprocess mode (as with prometheus_client's own class)

    def get(self) -> float:
        return self._value

    def get_exemplar(self) -> None:
        return None


def install() -> bool:
    """Use :class:`BufferedValue` for every metric made from now on, when this process is in
    multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set; the supervisor sets it for its workers).
    Call before the gateway makes its metrics."""
    if not os.environ.get(ENV_DIR):
        return False
    values.ValueClass = BufferedValue
    return True


def sync() -> None:
    """Write every value that changed since the last sync to this process's files."""
    with _lock:
        for v in _values:
            if v._value != v._written:
                v._file.write_value(v._key, v._value, v._timestamp)
                v._written = v._value


def start_syncing() -> asyncio.Task[None] | None:
    """In multiprocess mode, the task that syncs this process's values (None otherwise)."""
    return asyncio.create_task(sync_forever(), name="kaiyuan-metrics-sync") if active() else None


async def sync_forever() -> None:
    """Sync every ``SYNC_INTERVAL_S`` until cancelled; then once more."""
    try:
        while True:
            await asyncio.sleep(SYNC_INTERVAL_S)
            sync()
    finally:
        with contextlib.suppress(Exception):
            sync()


def active() -> bool:
    return values.ValueClass is BufferedValue
