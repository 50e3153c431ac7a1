"""`kaiyuan serve --workers 2`: one socket, two gateway processes, and limits, budgets, key
revocation and metrics that hold across both with no Redis (the supervisor's shared counters).
Also: SIGTERM lets an in-flight stream finish, SIGHUP reloads the config without refusing a
connection, and a killed worker is replaced.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest
import yaml
from prometheus_client.mmap_dict import MmapedDict
from sqlalchemy import create_engine, func, select

from kaiyuan.store.schema import request_log, spend_ledger, usage_hourly
from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI
from tests.http import http

MASTER = "sk-master-workers-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    url: str
    proc: subprocess.Popen[bytes]
    config_path: Path
    config: dict[str, Any]
    log: Path

    def workers(self) -> list[psutil.Process]:
        return [c for c in psutil.Process(self.proc.pid).children() if c.is_running() and c.status() != "zombie"]

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        r = http(method, self.url + path, body, MASTER)
        assert r.status_code in (200, 201), r.text
        return r.json()


def _config(fake: FakeOpenAI, tmp_path: Path, models: tuple[str, ...] = ("cheap",)) -> dict[str, Any]:
    return {
        "server": {"master_key": MASTER, "shutdown_grace_s": 20},
        "store": {"url": f"sqlite:///{tmp_path / 'kaiyuan.db'}"},
        "request_log": {"flush_interval_s": 0.2},
        "console": {"rollup_interval_s": 0.3},
        "accounting": {"spend_flush_interval_s": 0.2},
        "limits": {"key_cache_ttl_s": 30},  # long: revocation must reach the other worker by message
        "models": [
            {"name": name, "deployments": [{
                "provider": "openai_compatible", "base_url": fake.url + "/v1",  # type: ignore[attr-defined]
                "model": "upstream-chat", "api_key": "sk-upstream",
                "price": {"input": 1000, "output": 2000},  # about $0.02 a request
            }]}
            for name in models
        ],
    }


def _wait_ready(s: Served, n_workers: int) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if s.proc.poll() is not None:
            raise RuntimeError(f"supervisor exited {s.proc.returncode}: {s.log.read_text()[-3000:]}")
        try:
            if "workers ready" in s.log.read_text() and len(s.workers()) >= n_workers:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"not ready: {s.log.read_text()[-3000:]}")


@pytest.fixture
def served(fake_openai: FakeOpenAI, tmp_path: Path) -> Iterator[Served]:
    cfg = _config(fake_openai, tmp_path)
    path = tmp_path / "kaiyuan.yaml"
    path.write_text(yaml.safe_dump(cfg))
    port = _free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "kaiyuan", "serve", "--config", str(path), "--port", str(port),
                                 "--workers", "2"], stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ))
    s = Served(f"http://127.0.0.1:{port}", proc, path, cfg, log)
    try:
        _wait_ready(s, 2)
        yield s
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()


def _chat(url: str, key: str, stream: bool = False, client: openai.OpenAI | None = None) -> str:
    """One chat request (a new client, so a new connection, unless ``client`` is given); retries off."""
    c = client or openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    try:
        if stream:
            chunks = c.chat.completions.create(model="cheap", messages=[{"role": "user", "content": "hi there"}],
                                               max_tokens=20, stream=True)
            return "ok" if "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) else "empty"
        c.chat.completions.create(model="cheap", messages=[{"role": "user", "content": "hi there"}], max_tokens=20)
        return "ok"
    except openai.RateLimitError as e:
        return f"429:{e.code}"
    except openai.AuthenticationError:
        return "401"
    except openai.APIStatusError as e:
        return f"{e.status_code}"


def test_two_workers_share_one_socket_and_rate_limits(served: Served) -> None:
    assert len(served.workers()) == 2
    key = served.admin("POST", "/admin/keys", {"name": "rpm", "rpm": 12})["key"]
    if time.time() % 60 > 50:  # RPM windows are calendar minutes: start the burst in a fresh one
        time.sleep(60.5 - time.time() % 60)
    minute = int(time.time() // 60)
    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _i: _chat(served.url, key), range(40)))
    assert all(r == "ok" or r.startswith("429") for r in results), results
    if int(time.time() // 60) == minute:
        # Per-worker counters would let up to 24 through; shared ones let exactly 12.
        assert results.count("ok") == 12, results
    else:  # the burst straddled a minute boundary (a stalled machine): 12 per calendar minute
        assert 12 <= results.count("ok") <= 24, results


async def test_shared_counters_admit_exactly_the_limit_from_two_workers_and_per_calendar_minute(tmp_path: Path) -> None:
    """The same rule without HTTP: two workers' connections race 40 admits into one window, and a
    window boundary lets a new minute's limit through (the documented fixed-window tolerance)."""
    import asyncio

    from kaiyuan.limits.counters import RateCheck, Ticket
    from kaiyuan.limits.shared import CounterServer, SharedCounters

    server = CounterServer(str(tmp_path / "c.sock"))
    await server.start()
    workers = [SharedCounters(server.path), SharedCounters(server.path)]
    try:
        async def burst(now: float) -> int:
            rates = [RateCheck("key:k", 12, None, None)]
            got = await asyncio.gather(*(workers[i % 2].admit(rates, [], 1, now) for i in range(40)))
            return sum(isinstance(t, Ticket) for t in got)

        assert await burst(120.0) == 12  # one calendar minute, two workers: exactly the limit
        assert await burst(179.9) == 0  # the same minute
        assert await burst(180.0) == 12  # a new minute, 0.1 s later: 24 in a few seconds at most
    finally:
        for w in workers:
            await w.close()
        await server.close()


def test_budget_holds_across_workers_under_concurrent_load(served: Served, fake_openai: FakeOpenAI) -> None:
    key = served.admin("POST", "/admin/keys", {"name": "budget", "budgets": [{"period": "total", "limit_usd": 0.2}]})
    before = len(fake_openai.requests)
    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: _chat(served.url, key["key"], stream=i % 3 == 0), range(60)))
    ok = results.count("ok")
    assert ok >= 1 and all(r == "ok" or r.startswith("429") for r in results), results
    assert len(fake_openai.requests) - before == ok  # a refused request never reached the upstream
    engine = create_engine(served.config["store"]["url"])
    q = select(func.count(), func.coalesce(func.sum(spend_ledger.c.cost_usd), 0)).where(spend_ledger.c.key_id == key["id"])
    deadline = time.monotonic() + 15
    rows, spent = 0, 0.0
    while time.monotonic() < deadline:  # each worker's ledger writer flushes every 0.2 s
        with engine.connect() as conn:
            rows, spent = conn.execute(q).one()
        if rows >= ok:
            break
        time.sleep(0.3)
    engine.dispose()
    assert rows == ok, results  # every request the upstream answered has its ledger row
    assert float(spent) <= 0.2 + 1e-9, (spent, results)


def test_revoking_a_key_on_one_worker_reaches_the_other(served: Served) -> None:
    key = served.admin("POST", "/admin/keys", {"name": "revoke-me"})
    with cf.ThreadPoolExecutor(8) as pool:  # warm both workers' key caches
        assert set(pool.map(lambda _i: _chat(served.url, key["key"]), range(16))) == {"ok"}
    served.admin("POST", f"/admin/keys/{key['id']}/revoke")
    time.sleep(0.5)  # the invalidation is a message, not a cache expiry (the TTL here is 30 s)
    with cf.ThreadPoolExecutor(8) as pool:
        after = list(pool.map(lambda _i: _chat(served.url, key["key"]), range(16)))
    assert set(after) == {"401"}, after


def test_metrics_sum_every_worker(served: Served) -> None:
    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _i: _chat(served.url, MASTER), range(20)))
    deadline = time.monotonic() + 10  # each worker writes its values to the shared files once a second
    while True:
        text = http("GET", served.url + "/metrics", key=MASTER).text
        total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith("kaiyuan_requests_total{") and 'model="cheap"' in line)
        if total >= 20 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert total == 20, text[:2000]


def _rows_written_by(metrics_dir: str, pid: int) -> float:
    """``kaiyuan_store_rows_written{writer="request_log"}`` as counted by process ``pid`` alone (its
    own file in the Prometheus multiprocess directory)."""
    path = Path(metrics_dir) / f"counter_{pid}.db"
    if not path.exists():
        return 0.0
    total = 0.0
    for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
        _name, sample, labels, *_ = json.loads(key)
        if sample == "kaiyuan_store_rows_written_total" and labels.get("writer") == "request_log":
            total += value
    return total


def test_the_supervisor_writes_every_workers_request_log(served: Served) -> None:
    """The workers ship their request-log rows to the supervisor, the one writer
    (observability.log_sink): no worker runs a writer thread for them, and a graceful stop loses none."""
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: _chat(served.url, MASTER, stream=i % 2 == 0), range(40)))
    assert results == ["ok"] * 40
    workers = served.workers()
    metrics_dir = workers[0].environ()["PROMETHEUS_MULTIPROC_DIR"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _rows_written_by(metrics_dir, served.proc.pid) < 40:
        time.sleep(0.2)
    assert _rows_written_by(metrics_dir, served.proc.pid) == 40  # all written by the supervisor...
    assert [_rows_written_by(metrics_dir, w.pid) for w in workers] == [0.0, 0.0]  # ...none by a worker
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=40) == 0
    engine = create_engine(served.config["store"]["url"])
    with engine.connect() as conn:
        rows = conn.execute(select(request_log.c.status, request_log.c.stream).where(request_log.c.model == "cheap")).all()
    engine.dispose()
    assert sorted(rows) == sorted([(200, False)] * 20 + [(200, True)] * 20)


def test_the_supervisor_rolls_up_the_log(served: Served) -> None:
    """The console's hourly rollup runs in the supervisor (a worker leaves it alone:
    tests/test_rollup_placement.py), so the usage pages still see every worker's requests."""
    assert [_chat(served.url, MASTER) for _ in range(10)] == ["ok"] * 10
    engine = create_engine(served.config["store"]["url"])
    deadline = time.monotonic() + 30
    rolled = 0
    while time.monotonic() < deadline and rolled < 10:
        time.sleep(0.3)
        with engine.connect() as conn:
            rolled = conn.execute(select(func.coalesce(func.sum(usage_hourly.c.requests), 0))
                                  .where(usage_hourly.c.model == "cheap")).scalar_one()
    engine.dispose()
    assert rolled == 10


def test_sigterm_lets_an_inflight_stream_finish(served: Served, fake_openai: FakeOpenAI) -> None:
    fake_openai.next(Behaviour(chunk_delay=0.3))  # a stream of a few seconds
    out: dict[str, str] = {}
    t = threading.Thread(target=lambda: out.setdefault("r", _chat(served.url, MASTER, stream=True)))
    t.start()
    time.sleep(1.0)
    served.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert out.get("r") == "ok"
    assert served.proc.wait(timeout=40) == 0


def test_sighup_reloads_without_dropping_a_request(served: Served, fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    """Clients busy through a reload, with retries off: two reuse one keep-alive connection, one
    streams on one, one opens a connection per request. The old workers stop accepting and answer
    what still arrives on their connections with ``Connection: close`` (kaiyuan.server.drain), which
    the SDK's httpx honours: no request is refused, dropped or answered with an error."""
    stop = threading.Event()
    results: list[str] = []

    def load(kind: str) -> None:  # every outcome is a result: an exception must not just end the thread unseen
        client = None if kind == "fresh" else openai.OpenAI(base_url=served.url + "/v1", api_key=MASTER, max_retries=0)
        while not stop.is_set():
            try:
                results.append(_chat(served.url, MASTER, stream=kind == "stream", client=client))
            except openai.APIConnectionError as e:
                results.append(f"{kind}: {type(e.__cause__).__name__}: {e.__cause__}")

    threads = [threading.Thread(target=load, args=(kind,)) for kind in ("keep-alive", "keep-alive", "stream", "fresh")]
    for th in threads:
        th.start()
    time.sleep(1.0)
    old = {p.pid for p in served.workers()}
    served.config_path.write_text(yaml.safe_dump(_config(fake_openai, tmp_path, ("cheap", "added-on-reload"))))
    served.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not (old.isdisjoint(p.pid for p in served.workers())
                                               and len(served.workers()) == 2):
        time.sleep(0.3)
    time.sleep(1.0)
    stop.set()
    for th in threads:
        th.join(30)
    assert old.isdisjoint(p.pid for p in served.workers()), "the old workers are still there"
    assert results.count("ok") > 20 and set(results) == {"ok"}, [r for r in results if r != "ok"][:5]
    models = {m["id"] for m in http("GET", served.url + "/v1/models", key=MASTER).json()["data"]}
    assert "added-on-reload" in models


def test_sighup_with_a_broken_config_keeps_serving(served: Served) -> None:
    old = {p.pid for p in served.workers()}
    served.config_path.write_text("models: [this is not: valid")
    served.proc.send_signal(signal.SIGHUP)
    time.sleep(2.0)
    assert {p.pid for p in served.workers()} == old
    assert _chat(served.url, MASTER) == "ok"
    assert "not valid" in served.log.read_text()


def test_a_killed_worker_is_replaced(served: Served) -> None:
    victim = served.workers()[0]
    victim.kill()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = {p.pid for p in served.workers()}
        if len(pids) == 2 and victim.pid not in pids:
            break
        time.sleep(0.3)
    assert victim.pid not in {p.pid for p in served.workers()} and len(served.workers()) == 2
    assert _chat(served.url, MASTER) == "ok"


def test_bad_worker_count_is_refused(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "kaiyuan", "serve", "--workers", "0"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "workers" in r.stderr


def test_workers_stop_when_the_supervisor_is_killed_outright(served: Served) -> None:
    """SIGKILL gives the supervisor no chance to stop its workers: they notice it is gone and stop
    themselves, instead of serving on as orphans (found leaking from the multi-replica fault test)."""
    workers = served.workers()
    assert len(workers) == 2
    served.proc.kill()
    served.proc.wait(10)
    deadline = time.monotonic() + 90  # each drains first (shutdown_grace_s: 20)
    while time.monotonic() < deadline and any(w.is_running() and w.status() != "zombie" for w in workers):
        time.sleep(0.3)
    alive = [(w.pid, w.status(), " ".join(w.cmdline()[-6:])) for w in workers if w.is_running() and w.status() != "zombie"]
    for w in workers:  # do not leak them should the assertion fail
        if w.is_running():
            w.kill()
    assert alive == [], served.log.read_text()[-3000:]


async def test_shared_counters_refuse_settle_peek_and_relay(tmp_path: Path) -> None:
    """The supervisor's counters over their socket: a budget denial with its numbers, a settle that
    frees the reservation and counts the spend, a peek, an invalidation relayed to the other worker
    only, and a garbage frame that closes only the connection that sent it."""
    import asyncio

    from kaiyuan.limits.counters import BudgetCheck, Denial, NeedSeed, RateCheck, Ticket
    from kaiyuan.limits.shared import CounterServer, SharedCounters, SharedCountersUnavailable

    server = CounterServer(str(tmp_path / "c.sock"))
    await server.start()
    heard: list[tuple[int, str | None]] = []
    a = SharedCounters(server.path, on_invalidate=lambda k: heard.append((0, k)))
    b = SharedCounters(server.path, on_invalidate=lambda k: heard.append((1, k)))
    try:
        await a.connect()
        await b.connect()
        budget = [BudgetCheck("b1:0", 1000, 0, 600, None)]
        rates = [RateCheck("key:k", None, None, 5)]
        assert isinstance(await a.admit(rates, [BudgetCheck("b2:0", 1000, -1, 10, None)], 3, 60.0), NeedSeed)
        t = await a.admit(rates, budget, 3, 60.0)
        assert isinstance(t, Ticket) and t.shared_id is not None and t.minute == 1 and t.budgets is budget
        d = await b.admit(rates, budget, 3, 60.0)
        assert isinstance(d, Denial) and (d.kind, d.index, d.current, d.reserved) == ("budget", 0, 0, 600)
        assert await b.peek_budget("b1:0") == (0, 600)
        assert a.settle_later(t, [250], 10)
        for _ in range(100):  # the settle has no answer: wait until the supervisor applied it
            if await b.peek_budget("b1:0") == (250, 0):
                break
            await asyncio.sleep(0.01)
        assert await b.peek_budget("b1:0") == (250, 0)
        assert await b.peek_budget("nothing") is None
        await a.publish_invalidation("hash1")
        for _ in range(100):
            if heard:
                break
            await asyncio.sleep(0.01)
        assert heard == [(1, "hash1")]
        # a worker that sends garbage is cut off; the other keeps working
        t2 = a._open()
        assert t2 is not None
        t2.write(b"\x00\x00\x00\x03abc")
        for _ in range(100):
            if a._open() is None:
                break
            await asyncio.sleep(0.01)
        assert isinstance(await b.admit(rates, [], 1, 60.0), Ticket)
        assert isinstance(await a.admit(rates, [], 1, 60.0), Ticket)  # a reconnects on its next call
    finally:
        await a.close()
        await b.close()
        await server.close()
    try:
        await a.admit(rates, [], 1, 60.0)
    except SharedCountersUnavailable:
        pass
    else:
        raise AssertionError("a closed client must fail closed")


async def test_a_settle_rides_with_the_next_admit_or_goes_alone_shortly(tmp_path: Path) -> None:
    """Settles are buffered (one write with the next admit's, or SETTLE_DELAY_S later): a parallel
    slot a settle frees is free for the admit written after it, and a lone settle still arrives."""
    import asyncio

    from kaiyuan.limits.counters import BudgetCheck, RateCheck, Ticket
    from kaiyuan.limits.shared import CounterServer, SharedCounters

    server = CounterServer(str(tmp_path / "c.sock"))
    await server.start()
    w = SharedCounters(server.path)
    try:
        rates = [RateCheck("key:p", None, None, 1)]  # one request at a time
        budget = [BudgetCheck("b:0", 10_000, 0, 100, None)]
        t1 = await w.admit(rates, budget, 1, 60.0)
        assert isinstance(t1, Ticket)
        assert w.settle_later(t1, [40], 1)
        assert server.counters.budgets["b:0"] == [0, 100]  # not written yet
        t2 = await w.admit(rates, budget, 1, 60.0)  # the settle goes first, in the same write
        assert isinstance(t2, Ticket), t2
        assert server.counters.budgets["b:0"] == [40, 100]
        assert w.settle_later(t2, [7], 1)
        for _ in range(200):  # no admit follows: the settle goes alone after SETTLE_DELAY_S
            if server.counters.budgets["b:0"] == [47, 0]:
                break
            await asyncio.sleep(0.005)
        assert server.counters.budgets["b:0"] == [47, 0]
        assert server.counters.parallel["key:p"] == 0
    finally:
        await w.close()
        await server.close()
