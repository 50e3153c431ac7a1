"""The benchmark's own tools count what they claim to: the fast upstream's wire format, and the load
generator's chunk-loss and [DONE] accounting (a benchmark that cannot see a lost chunk proves nothing)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.loadgen import Spec, run
from bench.report import pct

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    p = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "fast_upstream.py"), "--port", "0", "--chunks", "20"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        line = p.stdout.readline()  # "PORT <n> PID <pid>"
        assert line.startswith("PORT "), line
        yield int(line.split()[1])
    finally:
        p.terminate()
        p.wait(10)


def _post(port: int, body: dict[str, object]) -> tuple[int, str, bytes]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read()


def test_upstream_speaks_openai_json_and_sse(upstream: int) -> None:
    status, ctype, data = _post(upstream, {"model": "fast", "messages": []})
    assert status == 200 and ctype == "application/json"
    obj = json.loads(data)
    assert obj["object"] == "chat.completion" and obj["usage"]["completion_tokens"] == 20

    _, ctype, data = _post(upstream, {"model": "paced-3-1", "stream": True})
    events = [e for e in data.decode().split("\n\n") if e]
    assert ctype == "text/event-stream"
    assert events[-1] == "data: [DONE]"
    assert len(events) == 1 + 3 + 1 + 1  # role, 3 content chunks, finish, [DONE]; no usage unless asked
    assert all('"usage"' not in e for e in events)

    _, _, data = _post(upstream, {"model": "fast", "stream": True, "stream_options": {"include_usage": True}})
    events = [e for e in data.decode().split("\n\n") if e]
    usage = json.loads(events[-2][len("data: "):])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 20


def _spec(port: int, body: dict[str, object], **kw: object) -> Spec:
    base: dict[str, object] = {
        "host": "127.0.0.1", "port": port, "path": "/v1/chat/completions", "body": json.dumps(body),
        "stream": bool(body.get("stream")), "concurrency": 3, "per_conn": 4, "timeout": 10.0,
    }
    base.update(kw)
    return Spec(**base)  # type: ignore[arg-type]


def test_loadgen_counts_every_chunk_and_done(upstream: int) -> None:
    res = asyncio.run(run(_spec(upstream, {"model": "fast", "stream": True}, expect_chunks=20)))
    assert res.ok == 12 and res.errors == 0
    assert res.chunks_expected == 240 and res.chunks_received == 240
    assert res.streams_with_loss == 0 and res.missing_done == 0 and len(res.ttfc) == 12


def test_loadgen_sees_missing_chunks_and_missing_done(upstream: int) -> None:
    # The upstream sends 20 chunks; asking for 25 must show 5 lost per stream.
    res = asyncio.run(run(_spec(upstream, {"model": "fast", "stream": True}, expect_chunks=25, done_marker="no-such")))
    assert res.ok == 12
    assert res.chunks_expected - res.chunks_received == 12 * 5
    assert res.streams_with_loss == 12 and res.missing_done == 12


def test_loadgen_records_http_errors(upstream: int) -> None:
    res = asyncio.run(run(_spec(upstream, {"model": "fast"}, path="/v1/nope", per_conn=2)))
    assert res.ok == 0 and res.errors == 6 and res.status_counts == {"404": 6}


def test_percentiles_are_nearest_rank() -> None:
    xs = [float(i) for i in range(1, 101)]
    assert pct(xs, 50) == 50.0 and pct(xs, 99) == 99.0 and pct(xs, 100) == 100.0
    assert pct([], 50) is None and pct([7.0], 99) == 7.0


def test_soak_slope_is_least_squares_in_mib_per_minute() -> None:
    from bench.soak import slope_per_min

    assert slope_per_min([(0.0, 100.0), (60.0, 102.0), (120.0, 104.0)]) == pytest.approx(2.0)
    assert slope_per_min([(0.0, 100.0), (30.0, 101.0), (60.0, 100.0)]) == pytest.approx(0.0)
    assert slope_per_min([(5.0, 100.0)]) is None  # one point has no slope


def test_soak_refuses_bad_arguments() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--rate", "0"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--rate" in r.stderr


def test_soak_smoke_reports_memory_and_every_row(tmp_path: Path) -> None:
    """A few seconds of the real soak (upstream + gateway + open-loop driver): the report has its
    shape, every request was answered, and the request log holds one row per answered request."""
    cmd = [sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "0.05", "--warmup-minutes", "0.02",
           "--rate", "40", "--interval", "0.5", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    c = rep["counters"]
    assert c["sent"] > 50 and c["answered"] == c["sent"] and c["errors"] == 0 and c["streams"] > 0
    assert rep["rows"] == {"request_log": c["answered"]} and rep["rows_lost"] == {"request_log": 0}
    assert rep["rss_start_mib"] > 10 and rep["rss_max_mib"] >= rep["rss_end_mib"]
    assert rep["samples"] >= 3 and rep["slope_mib_per_min"] is not None
    assert rep["verdict"] in ("flat", "GROWING") and "verdict:" in r.stdout
    rows = (tmp_path / "samples.csv").read_text().splitlines()
    assert rows[0] == "t_s,phase,rss_mib,leader_mib,others_mib,procs,sent,answered,errors,inflight,skipped"
    assert len(rows) > rep["samples"] and rep["per_process"] is None  # one process: nothing to split


def test_soak_with_a_supervisor_splits_rss_and_snapshots_the_worker(tmp_path: Path) -> None:
    """The default layout (a supervisor and its worker): RSS per process, a config patch applied,
    and --tracemalloc asks the worker (the supervisor has no SIGUSR1 handler) for its heap."""
    cmd = [sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "0.05", "--warmup-minutes", "0.02",
           "--rate", "20", "--interval", "0.5", "--out", str(tmp_path), "--with", "sup", "--tracemalloc", "--smaps",
           "--patch", '{"server": {"malloc_trim_interval_s": 0.5}}']
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    assert "malloc_trim_interval_s" in rep["variant"] and rep["counters"]["errors"] == 0
    sup, wrk = rep["per_process"]["supervisor"], rep["per_process"]["workers"]
    assert sup["start_mib"] > 10 and wrk["start_mib"] > 10
    assert abs(sup["end_mib"] + wrk["end_mib"] - rep["rss_end_mib"]) < 0.01
    assert "traced heap grew by" in (tmp_path / "heap-diff.txt").read_text()
    assert "workers:" in r.stdout
    assert set(rep["smaps_kib"]) == {"supervisor", "workers"}  # memory by kind, per process
    smaps_rows = (tmp_path / "smaps.csv").read_text().splitlines()
    assert smaps_rows[0] == "t_s,phase,pid,role,heap_kib,thread_arenas_kib,anon_kib,file_kib"
    assert {row.split(",")[3] for row in smaps_rows[1:]} == {"supervisor", "workers"}


def test_smaps_breakdown_adds_up_to_rss() -> None:
    from bench.smaps import breakdown

    kib = breakdown(os.getpid())
    assert kib is not None and kib["file"] > 0 and kib["heap"] + kib["anon"] > 0
    with open(f"/proc/{os.getpid()}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    assert abs(sum(kib.values()) - rss) < 0.05 * rss  # the same pages, read a moment apart
    assert breakdown(2**22 + 12345) is None  # no such process


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_soak_stalls_stop_the_process_and_always_let_it_go() -> None:
    """bench/stall.py: a real child process is stopped and continued on schedule, its RSS is read
    around each stall, and cancelling mid-stall still continues it (a stopped gateway would hang)."""
    from bench.stall import Stall, stall_loop, summary

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        async def go() -> tuple[list[Stall], bool]:
            out: list[Stall] = []
            stopped = False
            task = asyncio.create_task(stall_loop(child.pid, 0.3, 0.1, lambda: 7, out, settle_s=0.1))
            for _ in range(3000):  # the first stall, and the RSS read after it
                if out and out[-1].rss_after_mib is not None:
                    break
                await asyncio.sleep(0.01)
            for _ in range(3000):  # cancel during the next stop
                if stopped := _state(child.pid) == "T":
                    break
                await asyncio.sleep(0.002)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return out, stopped

        stalls, stopped = asyncio.run(go())
        assert stopped and _state(child.pid) in ("S", "R")  # cancelled while stopped, and let go
        assert stalls[0].inflight_at_resume == 7 and stalls[0].rss_before_mib > 1 and stalls[0].rss_after_mib
        s = summary([Stall(1, 1, 5, 100.0, 103.0), Stall(2, 1, 5, 103.5, 103.5), Stall(3, 1, 5, 104.0, None)])
        assert s["steps_mib"] == [3.0, 0.0] and s["first_step_mib"] == 3.0 and s["later_steps_sum_mib"] == 0.0
        assert s["between_stalls_sum_mib"] == 0.5 and s["count"] == 3
    finally:
        child.kill()
        child.wait()


def test_soak_refuses_a_stall_longer_than_its_period() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--stall-every", "2", "--stall-for", "3"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--stall-for" in r.stderr


# -- the soak driver and a keep-alive connection the server closes under a request ----------------
OK_REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def _scripted_server(script: list[list[bytes | None]]) -> tuple[asyncio.Server, int]:
    """Connection ``i`` answers its requests with ``script[i]`` in turn: bytes are written (the
    connection kept), None closes it once that request has arrived, unanswered."""
    conns = iter(script)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in next(conns):
            head = (await reader.readuntil(b"\r\n\r\n")).lower()
            length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            await reader.readexactly(length)
            if answer is None:
                break
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _drive(script: list[list[bytes | None]], requests: int) -> Any:
    from bench.soak import Driver

    server, port = await _scripted_server(script)
    async with server:
        drv = Driver(port, {}, rate=1.0, stream_share=0.0, max_inflight=4, timeout=10.0)
        for _ in range(requests):
            await drv.one(False)
        await drv.drain()
    return drv.c


async def test_soak_resends_a_request_whose_idle_connection_closed_unanswered() -> None:
    """The keep-alive race (bench/RESULTS.md, round 4: 3 resets): the server closes the reused
    connection as the request arrives. The driver sends it again on a new connection, as HTTP
    clients do, and counts it apart: not an error."""
    c = await _drive([[OK_REPLY, None], [OK_REPLY]], 2)
    assert (c.sent, c.answered, c.ok, c.errors, c.retried_idle, c.connects) == (2, 2, 2, 0, 1, 2)


async def test_soak_does_not_resend_when_an_answer_had_begun_or_the_connection_was_new() -> None:
    # a reused connection that sent part of an answer, then closed: an error (a request that may have run)
    c = await _drive([[OK_REPLY, b"HTTP/1.1 200 OK\r\nContent-Le"], [OK_REPLY]], 2)
    assert (c.answered, c.errors, c.retried_idle) == (1, 1, 0)
    # a new connection closed before any answer: an error (no idle keep-alive race to excuse it)
    c = await _drive([[None], [OK_REPLY]], 1)
    assert (c.answered, c.errors, c.retried_idle, c.connects) == (0, 1, 0, 1)
