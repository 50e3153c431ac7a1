"""KAIYUAN_TRACEMALLOC: off unless set; when set, SIGUSR1 writes a heap snapshot that loads; a
path that cannot be a directory is a clear configuration error, not a traceback."""

from __future__ import annotations

import os
import signal
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from kaiyuan.config import ConfigError
from kaiyuan.observability import memtrace


@pytest.fixture
def restore() -> Iterator[None]:
    old = signal.getsignal(signal.SIGUSR1)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, old)
        tracemalloc.stop()


def test_off_unless_the_variable_is_set(monkeypatch: pytest.MonkeyPatch, restore: None) -> None:
    monkeypatch.delenv(memtrace.ENV, raising=False)
    assert memtrace.install_from_env() is None
    assert not tracemalloc.is_tracing()


def test_sigusr1_writes_a_loadable_snapshot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, restore: None) -> None:
    monkeypatch.setenv(memtrace.ENV, str(tmp_path / "heap"))
    assert memtrace.install_from_env() == tmp_path / "heap"
    assert tracemalloc.is_tracing()
    keep = [bytearray(1000) for _ in range(100)]  # something to see in the snapshot
    for _ in range(2):
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0)  # the handler runs between bytecodes of the main thread
    files = sorted((tmp_path / "heap").iterdir())
    assert [f.name for f in files] == [f"heap-{os.getpid()}-1.tracemalloc", f"heap-{os.getpid()}-2.tracemalloc"]
    snap = tracemalloc.Snapshot.load(str(files[1]))
    assert sum(s.size for s in snap.statistics("filename") if s.traceback[0].filename == __file__) >= 100_000
    del keep


def test_a_file_in_the_way_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, restore: None) -> None:
    (tmp_path / "f").write_text("x")
    monkeypatch.setenv(memtrace.ENV, str(tmp_path / "f"))
    with pytest.raises(ConfigError, match="KAIYUAN_TRACEMALLOC"):
        memtrace.install_from_env()
    assert not tracemalloc.is_tracing()
