"""kaiyuan serve tunes the cyclic garbage collector once it has started (server.app.tune_gc)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from kaiyuan.server.app import GC_GEN0_THRESHOLD, tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_tune_gc_freezes_the_startup_heap_and_raises_the_young_threshold(restore_gc: None) -> None:
    gc.unfreeze()
    _, gen1, gen2 = gc.get_threshold()
    tune_gc()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (GC_GEN0_THRESHOLD, gen1, gen2)


def test_cycles_are_still_collected_after_tuning(restore_gc: None) -> None:
    tune_gc()

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # type: ignore[attr-defined]
    ref = __import__("weakref").ref(a)
    del a, b
    gc.collect(0)
    assert ref() is None


def test_the_young_threshold_can_be_set_from_the_environment(restore_gc: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAIYUAN_GC_GEN0", "20000")
    tune_gc()
    assert gc.get_threshold()[0] == 20000
    for bad in ("", "abc", "-5", "10"):  # not a number, or too small to be meant: the default
        monkeypatch.setenv("KAIYUAN_GC_GEN0", bad)
        tune_gc()
        assert gc.get_threshold()[0] == GC_GEN0_THRESHOLD
