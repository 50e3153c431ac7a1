"""Multiprocess metrics kept in memory and synced (kaiyuan.observability.multiproc): after a sync,
prometheus_client's own collector reads exactly what its own file-per-increment class would have
written; before a sync, nothing of the new counts is in the files. Each case runs in a fresh
interpreter: the value class is chosen process-wide."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import os, sys
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from kaiyuan.observability import multiproc
if sys.argv[2] == "buffered":
    assert multiproc.install() and multiproc.active()
r = CollectorRegistry()
c = Counter("reqs", "r", ["model"], registry=r)
h = Histogram("lat", "l", ["model"], buckets=(0.1, 1.0), registry=r)
g = Gauge("inflight", "i", registry=r, multiprocess_mode="livesum")
for i in range(7):
    c.labels("a" if i % 2 else "b").inc()
    h.labels("a").observe(i / 10)
g.inc(3); g.dec(1)
if sys.argv[2] == "buffered":
    before = CollectorRegistry(); multiprocess.MultiProcessCollector(before)
    text = generate_latest(before).decode()
    assert 'reqs_total{model="a"} 0.0' in text and "inflight 0.0" in text, "written before a sync: " + text
    multiproc.sync()
out = CollectorRegistry(); multiprocess.MultiProcessCollector(out)
sys.stdout.write(generate_latest(out).decode())
"""


def _run(tmp: Path, mode: str) -> str:
    tmp.mkdir()
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp), mode], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_synced_values_read_the_same_as_prometheus_clients_own(tmp_path: Path) -> None:
    ours, theirs = _run(tmp_path / "ours", "buffered"), _run(tmp_path / "theirs", "mmap")
    assert sorted(ours.splitlines()) == sorted(theirs.splitlines())  # the families' order follows the files'
    assert 'reqs_total{model="a"} 3.0' in ours and 'reqs_total{model="b"} 4.0' in ours
    assert 'lat_bucket{le="1.0",model="a"} 7.0' in ours and "inflight 2.0" in ours


def test_without_the_directory_nothing_changes(tmp_path: Path) -> None:
    code = "from kaiyuan.observability import multiproc; print(multiproc.install(), multiproc.active())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert r.stdout.split() == ["False", "False"], r.stderr
