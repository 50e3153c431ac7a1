"""The supervisor's request-log sink (kaiyuan.observability.log_sink): a worker's rows arrive whole
and equal to what the worker would have written itself; a worker that cannot reach the sink writes
its own rows; a sink that is gone or does not keep up costs counted drops, never an exception on
the request path; a garbage frame closes only its own connection."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from kaiyuan.config import RequestLogSettings
from kaiyuan.observability import log_sink
from kaiyuan.observability.log_sink import ENV_LOG_SOCKET, LogSink, RemoteRequestLog, open_request_log
from kaiyuan.observability.metrics import Metrics
from kaiyuan.observability.request_log import RequestLogWriter
from kaiyuan.store.batch_writer import WriterMetrics
from kaiyuan.store.db import open_store
from kaiyuan.store.schema import request_log
from tests.test_request_log_writer import _ctx

SETTINGS = RequestLogSettings(batch_size=8, flush_interval_s=0.05)


def _rows(url: str) -> list[dict[str, Any]]:
    with open_store(url).connect() as conn:
        return [dict(r) for r in conn.execute(select(request_log).order_by(request_log.c.id)).mappings()]


def _dropped(m: WriterMetrics) -> float:
    return float(m.dropped.labels("request_log")._value.get())


def _run(tmp_path: Path, body: Callable[[LogSink, str, WriterMetrics], Awaitable[None]]) -> None:
    url = f"sqlite:///{tmp_path}/sink.db"
    path = str(tmp_path / "log.sock")

    async def main() -> None:
        sink = LogSink(path, open_store(url), SETTINGS, Metrics().store)
        await sink.start()
        try:
            await body(sink, url, Metrics().store)
        finally:
            await sink.close()

    asyncio.run(main())


def _worker(path: str, url: str, metrics: WriterMetrics) -> RemoteRequestLog:
    return RemoteRequestLog(path, SETTINGS, RequestLogWriter(open_store(url), SETTINGS, metrics), metrics)


def test_shipped_rows_equal_the_rows_a_worker_writes_itself(tmp_path: Path) -> None:
    ref_url = f"sqlite:///{tmp_path}/ref.db"
    ref = RequestLogWriter(open_store(ref_url), SETTINGS, Metrics().store)

    async def body(sink: LogSink, url: str, m: WriterMetrics) -> None:
        remote = _worker(sink.path, url, m)
        await remote.start()
        for i in range(300):  # more than one batch (SEND_ROWS), and row 1 carries bodies
            c = _ctx(i)
            remote.submit(c)
            ref.submit(c)
        assert await remote.flush() == 300
        assert remote.pending == 0 and remote.local.pending == 0  # the worker wrote nothing itself
        await ref.flush()
        await remote.close()

    _run(tmp_path, body)
    got, expected = _rows(f"sqlite:///{tmp_path}/sink.db"), _rows(ref_url)
    assert len(got) == 300
    for g, e in zip(got, expected, strict=True):  # the latency is read when the row is built: the two differ
        assert g.pop("latency_ms") > 0 and e.pop("latency_ms") > 0
        assert g == e
    assert got[1]["response_body"] == "{}" and got[0]["cancelled"] is True


def test_rows_queued_at_close_are_written_when_the_sink_closes(tmp_path: Path) -> None:
    async def body(sink: LogSink, url: str, m: WriterMetrics) -> None:
        remote = _worker(sink.path, url, m)
        await remote.start()
        for i in range(5):
            remote.submit(_ctx(i))
        await remote.close()  # shipped, not flushed: the sink's close writes them

    _run(tmp_path, body)
    assert len(_rows(f"sqlite:///{tmp_path}/sink.db")) == 5


def test_an_unreachable_sink_means_the_worker_writes_its_own_rows(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/own.db"

    async def main() -> None:
        m = Metrics().store
        remote = _worker(str(tmp_path / "nobody.sock"), url, m)
        await remote.start()
        for i in range(3):
            remote.submit(_ctx(i))
        assert remote.pending == 3
        assert await remote.flush() == 3
        await remote.close()

    asyncio.run(main())
    assert len(_rows(url)) == 3


def test_a_sink_that_is_gone_costs_counted_drops_not_errors(tmp_path: Path) -> None:
    async def body(sink: LogSink, url: str, m: WriterMetrics) -> None:
        remote = _worker(sink.path, url, m)
        await remote.start()
        remote.submit(_ctx(0))
        assert await remote.flush() == 1
        await sink.close(grace_s=0.2)  # the supervisor is gone
        for _ in range(100):
            if remote._lost:
                break
            await asyncio.sleep(0.01)
        for i in range(1, 4):
            remote.submit(_ctx(i))  # never raises on the request path
        assert await remote.flush() == 0
        assert _dropped(m) == 3
        await remote.close()

    _run(tmp_path, body)


def test_a_sink_that_does_not_read_costs_counted_drops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log_sink, "MAX_UNSENT_BYTES", 1)
    path = str(tmp_path / "stuck.sock")
    url = f"sqlite:///{tmp_path}/stuck.db"

    async def main() -> None:
        conns: list[asyncio.StreamWriter] = []

        async def never_read(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            conns.append(w)
            await asyncio.sleep(3600)

        server = await asyncio.start_unix_server(never_read, path=path)
        m = Metrics().store
        remote = _worker(path, url, m)
        await remote.start()
        for i in range(40 * log_sink.SEND_ROWS):  # ~6 MiB of rows offered to a socket nobody reads
            remote.submit(_ctx(i))
        dropped = _dropped(m)
        assert 0 < dropped < 40 * log_sink.SEND_ROWS  # some went out (into the socket's buffer), the rest were counted
        assert dropped % log_sink.SEND_ROWS == 0  # whole batches
        remote._writer.transport.abort()
        if remote._reader_task is not None:
            remote._reader_task.cancel()
        server.close()
        for w in conns:
            w.close()

    asyncio.run(main())


def test_a_garbage_frame_closes_only_its_own_connection(tmp_path: Path) -> None:
    async def body(sink: LogSink, url: str, m: WriterMetrics) -> None:
        remote = _worker(sink.path, url, m)
        await remote.start()
        for junk in (b"\x00\x00\x00\x05hello", struct.pack(">I", 3) + b"[1]", b"\xff\xff\xff\xff"):
            r, w = await asyncio.open_unix_connection(sink.path)
            w.write(junk)
            await w.drain()
            assert await asyncio.wait_for(r.read(), 5) == b""  # the sink hung up on it
            w.close()
        remote.submit(_ctx(7))
        assert await remote.flush() == 1  # the well-behaved worker was not disturbed
        await remote.close()

    _run(tmp_path, body)
    assert [r["id"] for r in _rows(f"sqlite:///{tmp_path}/sink.db")] == ["req_0007"]


def test_a_worker_ships_only_when_its_supervisor_runs_a_sink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = open_store(f"sqlite:///{tmp_path}/pick.db")
    monkeypatch.delenv(ENV_LOG_SOCKET, raising=False)
    assert isinstance(open_request_log(engine, SETTINGS, Metrics().store), RequestLogWriter)
    monkeypatch.setenv(ENV_LOG_SOCKET, os.fspath(tmp_path / "log.sock"))
    assert isinstance(open_request_log(engine, SETTINGS, Metrics().store), RemoteRequestLog)
    assert isinstance(open_request_log(None, SETTINGS, Metrics().store), RequestLogWriter)  # no store, no log
