"""The periodic malloc_trim (kaiyuan/observability/malloc_trim.py): it returns freed C-heap pages
to the OS, runs on its period, and its setting is checked like every other."""

from __future__ import annotations

import asyncio
import platform
import subprocess
import sys
import textwrap

import pytest

from kaiyuan import background
from kaiyuan.config import ConfigError, parse_config
from kaiyuan.observability import malloc_trim

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")

# 1,000 blocks of 64 KiB (under glibc's mmap threshold, so they come from the main heap); the last
# one stays alive and pins the top of the heap, so free() alone cannot shrink it.
FRAGMENT = textwrap.dedent("""
    import sys
    from kaiyuan.observability.malloc_trim import load_trim

    def rss_kib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    blocks = [bytearray(64 * 1024) for _ in range(1000)]
    keep = blocks[-1]
    del blocks
    before = rss_kib()
    trimmed = load_trim()(0)
    print(before, rss_kib(), trimmed)
""")


@needs_glibc
def test_trim_hands_freed_heap_pages_back() -> None:
    out = subprocess.run([sys.executable, "-c", FRAGMENT], capture_output=True, text=True, check=True, timeout=60)
    before, after, trimmed = (int(x) for x in out.stdout.split())
    assert trimmed == 1  # glibc: 1 when memory was released
    assert before - after > 32 * 1024, out.stdout  # most of the ~64 MiB freed went back


@needs_glibc
def test_load_trim_finds_glibcs() -> None:
    fn = malloc_trim.load_trim()
    assert fn is not None and fn(0) in (0, 1)


async def test_the_task_trims_on_its_period_and_stops() -> None:
    calls: list[int] = []
    twice = asyncio.Event()

    def fake(pad: int) -> int:
        calls.append(pad)
        if len(calls) >= 2:
            twice.set()
        return 1

    task = malloc_trim.start(0.001, fake)
    assert task is not None
    await asyncio.wait_for(twice.wait(), 30)
    await background.stop(task)
    assert task.done() and calls[:2] == [0, 0]
    n = len(calls)
    await asyncio.sleep(0.01)
    assert len(calls) == n  # stopped: no more passes


async def test_off_when_zero_or_without_glibc() -> None:
    assert malloc_trim.start(0, lambda pad: 1) is None
    assert malloc_trim.start(30.0, None) is None or GLIBC
    await background.stop(None)


def test_setting_default_and_bad_values() -> None:
    cfg = parse_config({"models": []})
    assert cfg.server.malloc_trim_interval_s == 30.0
    assert parse_config({"models": [], "server": {"malloc_trim_interval_s": 0}}).server.malloc_trim_interval_s == 0
    for bad in (-1, "often"):
        with pytest.raises(ConfigError, match="malloc_trim_interval_s"):
            parse_config({"models": [], "server": {"malloc_trim_interval_s": bad}})
