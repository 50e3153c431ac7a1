"""Opt-in heap snapshots for hunting memory growth in a running gateway (bench/soak.py --tracemalloc).

With ``KAIYUAN_TRACEMALLOC=<dir>`` in its environment, ``kaiyuan serve`` starts :mod:`tracemalloc`
and, on each SIGUSR1, writes a snapshot to ``<dir>/heap-<pid>-<n>.tracemalloc`` (then renames it
into place, so a reader never sees half a file). Two snapshots taken under the same load, minutes
apart, compared with ``Snapshot.compare_to`` show which source lines hold the memory that grew.
Off by default: tracemalloc records every allocation, which costs CPU and memory on every request,
and writing a snapshot stops the event loop for as long as it takes.
"""

from __future__ import annotations

import itertools
import os
import signal
import tracemalloc
from pathlib import Path
from types import FrameType

from kaiyuan.config import ConfigError

ENV = "KAIYUAN_TRACEMALLOC"
FRAMES = 8  # frames kept per allocation: enough to see who called the allocating library


def install_from_env() -> Path | None:
    """Start tracing and the SIGUSR1 handler when ``KAIYUAN_TRACEMALLOC`` names a directory."""
    value = os.environ.get(ENV)
    if not value:
        return None
    out = Path(value)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{ENV}={value}: cannot use it as the heap snapshot directory: {e.strerror or e}") from None
    tracemalloc.start(FRAMES)
    counter = itertools.count(1)

    def dump(signum: int, frame: FrameType | None) -> None:
        path = out / f"heap-{os.getpid()}-{next(counter)}.tracemalloc"
        tmp = path.with_suffix(".tmp")
        tracemalloc.take_snapshot().dump(str(tmp))
        tmp.rename(path)

    signal.signal(signal.SIGUSR1, dump)
    return out
