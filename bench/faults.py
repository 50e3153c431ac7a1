"""Fault run: replicas sharing PostgreSQL and Redis, under load, through faults, for minutes.

The scenario of ``tests/test_multi_replica_faults.py`` (which runs one short round of it, through
this module) repeated for as long as asked. Each round gives a fresh virtual key a budget, loads the
replicas round-robin, and while the load runs: restarts Redis empty, pauses Redis (SIGSTOP) and
resumes it, stops PostgreSQL and starts it again, SIGKILLs a replica; then it runs the budget out.
The next round starts a replacement for the killed replica first.

What each round measures (issue 9's bar):
- overspend: the upstream's bill for the round (requests it received x the cost of one; every
  request costs the same) minus the budget, in requests per replica (the bar: at most 1);
- ledger completeness: ledger rows of the round's key against requests the upstream received; the
  only rows allowed missing are the SIGKILLed replica's (its requests in flight, answered "gone",
  and those it answered within three flush intervals before the kill);
- no client ever sees a 500.

    python bench/faults.py --minutes 5            # rounds until 5 minutes have passed
    python bench/faults.py --rounds 1 --hold-s 2  # about the test's length

Needs ``redis-server`` and PostgreSQL's ``initdb``/``pg_ctl`` (as the tests do).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import json
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kaiyuan.store.db import make_engine
from kaiyuan.store.schema import budgets, spend_ledger
from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI
from kaiyuan.testing.harness import GatewayProcess
from tests.http import http
from tests.services import PrivatePostgres, PrivateRedis

MASTER = "sk-master-faults"
FLUSH_S = 0.2
PROMPT = [{"role": "user", "content": "same prompt"}]


@dataclass
class Outcome:
    replica: int
    kind: str  # ok | budget | unavailable | gone (connection refused: a killed replica) | other:...
    at: float
    phase: str = ""  # the fault window the request was sent in


@dataclass
class PhaseMark:
    """The end of one fault window: what the upstream had received by then, and what the shared
    budget counter in Redis counted (spent ``s`` and reserved ``r``, nano-USD; None while missing)."""

    phase: str
    received: int
    spent: int | None
    reserved: int | None


@dataclass
class RoundReport:
    """One round's numbers, and whether issue 9's bar held."""

    budget: float
    replicas: int
    received: int  # requests the upstream received in the round
    rows: int  # ledger rows of the round's key
    ledger_usd: float
    one_cost: float
    lost_allowance: int  # rows the SIGKILL may have taken
    seconds: float
    outcomes: Counter[str] = field(default_factory=Counter)
    marks: list[PhaseMark] = field(default_factory=list)
    answered: list[Outcome] = field(default_factory=list)  # every outcome, in the order they ended

    @property
    def bill(self) -> float:
        return self.received * self.one_cost

    @property
    def over_requests_per_replica(self) -> float:
        return max(0.0, self.bill - self.budget) / self.one_cost / self.replicas if self.one_cost else 0.0

    def problems(self) -> list[str]:
        out = []
        others = sorted(k for k in self.outcomes if k.startswith("other"))
        if others:
            out.append(f"clients saw errors: {others}")
        if not self.outcomes["budget"]:
            out.append("the budget was never reached")
        if self.one_cost <= 0:
            out.append("no ledger row has a cost")
        elif self.bill > self.budget + self.replicas * self.one_cost + 1e-9:
            out.append(f"upstream billed ${self.bill:.4f} for {self.received} requests on a ${self.budget:.4f} budget "
                       f"(one request ${self.one_cost:.4f}, {self.replicas} replicas)")
        if not self.received - self.lost_allowance <= self.rows <= self.received:
            out.append(f"{self.rows} ledger rows for {self.received} requests received (allowance {self.lost_allowance})")
        if abs(self.ledger_usd - self.rows * self.one_cost) > 1e-6:
            out.append(f"ledger total ${self.ledger_usd:.6f} is not {self.rows} x ${self.one_cost:.6f}")
        return out

    def summary(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 1), "budget_usd": round(self.budget, 4), "received": self.received,
                "ledger_rows": self.rows, "missing_rows": self.received - self.rows,
                "missing_allowed": self.lost_allowance, "bill_usd": round(self.bill, 4),
                "overspend_usd": round(max(0.0, self.bill - self.budget), 4),
                "overspend_requests_per_replica": round(self.over_requests_per_replica, 3),
                "outcomes": dict(self.outcomes), "phases": self.phases(), "over_budget": self.over_budget(),
                "problems": self.problems()}

    def phases(self) -> list[dict[str, Any]]:
        """Per fault window: the 200s by replica, and the counter's deficit at its end: requests the
        upstream had received that the counter did not hold as spent or reserved (> 0: money the
        counter lost in that window or before; < 0: it counted more, which only refuses early)."""
        out = []
        for m in self.marks:
            ok = Counter(o.replica for o in self.answered if o.phase == m.phase and o.kind == "ok")
            row: dict[str, Any] = {"phase": m.phase, "ok_by_replica": dict(sorted(ok.items())), "received": m.received}
            if m.spent is not None and m.reserved is not None and self.one_cost:
                held = (m.spent + m.reserved) / 1e9
                row.update(counter_spent_usd=round(m.spent / 1e9, 4), counter_reserved_usd=round(m.reserved / 1e9, 4),
                           deficit_requests=round(m.received - held / self.one_cost, 2))
            out.append(row)
        return out

    def over_budget(self) -> dict[str, int]:
        """The 200s past what the budget pays for (in the order they ended), by "phase/replica"."""
        if not self.one_cost:
            return {}
        paid = int(self.budget / self.one_cost + 1e-9)
        ok = [o for o in self.answered if o.kind == "ok"]
        return dict(Counter(f"{o.phase}/r{o.replica}" for o in ok[paid:]))


class Cluster:
    """A private Redis, a private PostgreSQL and ``n`` ``kaiyuan serve`` processes sharing them."""

    def __init__(self, upstream_url: str, workdir: str, n: int = 3, slow_ledger_s: float = 0.0) -> None:
        self.workdir = workdir
        # replica 1 (never the killed one) writes its ledger rows only every slow_ledger_s (0: as the
        # others): a loaded machine or a slow database, made certain instead of left to chance
        self.slow_ledger_s = slow_ledger_s
        self.redis = PrivateRedis(Path(workdir))
        self.pg = PrivatePostgres()
        self.procs: list[GatewayProcess] = []
        self.n = n
        self.cfg: dict[str, Any] = {
            "server": {"master_key": MASTER},
            "store": {"url": self.pg.url},
            "request_log": {"flush_interval_s": FLUSH_S},
            "accounting": {"spend_flush_interval_s": FLUSH_S},
            "limits": {"backend": "redis", "redis_url": self.redis.url, "key_cache_ttl_s": 1},
            "models": [{"name": "paid", "deployments": [{
                "provider": "openai_compatible", "base_url": upstream_url + "/v1", "model": "upstream-chat",
                "api_key": "sk-upstream", "price": {"input": 1000, "output": 2000}}]}],
        }

    def start(self) -> None:
        self.redis.start()
        self.pg.start()
        self.procs.append(self._spawn(0))
        self.procs[0].wait_ready()  # the first one migrates the database
        self.procs += [self._spawn(i) for i in range(1, self.n)]
        for p in self.procs:
            p.wait_ready()

    @property
    def flush_s(self) -> float:
        """The longest ledger flush interval of the replicas."""
        return max(FLUSH_S, self.slow_ledger_s)

    def _spawn(self, i: int) -> GatewayProcess:
        cfg = self.cfg
        if i == 1 and self.slow_ledger_s:
            cfg = {**cfg, "accounting": {"spend_flush_interval_s": self.slow_ledger_s}}
        return GatewayProcess(cfg, self.workdir, env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])})

    def replace_dead(self) -> None:
        """Start a new replica in place of each one that is no longer running."""
        for i, p in enumerate(self.procs):
            if p.proc.poll() is not None:
                p.stop()
                self.procs[i] = self._spawn(i)
                self.procs[i].wait_ready()

    def budget_counter(self, key_id: str) -> str:
        """The Redis key of ``key_id``'s total budget counter."""
        engine = make_engine(self.pg.url)
        try:
            with engine.connect() as conn:
                bid = conn.execute(select(budgets.c.id).where(budgets.c.scope_id == key_id)).scalar_one()
        finally:
            engine.dispose()
        return f"ky:bud:{bid}:0"

    def counter(self, rkey: str) -> tuple[int | None, int | None]:
        """(spent, reserved) nano-USD of the budget counter ``rkey`` in Redis (None if missing)."""
        import redis

        r = redis.Redis.from_url(self.redis.url, socket_timeout=5)
        try:
            s, res = r.hmget(rkey, ["s", "r"])
        finally:
            r.close()
        return (None, None) if s is None else (int(s), int(res or 0))

    def new_key(self, budget_usd: float | None) -> tuple[str, str]:
        body: dict[str, Any] = {"name": "load"}
        if budget_usd is not None:
            body["budgets"] = [{"period": "total", "limit_usd": budget_usd}]
        r = http("POST", self.procs[0].url + "/admin/keys", body, MASTER)
        assert r.status_code == 201, r.text
        return r.json()["key"], r.json()["id"]

    def ledger(self, key_id: str) -> tuple[int, float, float]:
        """(rows, total USD, the largest row's cost) of ``key_id``."""
        engine = make_engine(self.pg.url)
        try:
            with engine.connect() as conn:
                q = select(func.count(), func.sum(spend_ledger.c.cost_usd), func.max(spend_ledger.c.cost_usd))
                row = conn.execute(q.where(spend_ledger.c.key_id == key_id)).one()
        finally:
            engine.dispose()
        return int(row[0]), float(row[1] or 0), float(row[2] or 0)

    def close(self) -> None:
        for p in self.procs:
            p.stop()
        self.redis.stop()
        self.pg.remove()


class Load:
    """``concurrency`` threads sending the same request round-robin to the replicas still alive."""

    def __init__(self, cluster: Cluster, key: str, concurrency: int) -> None:
        self.clients = [openai.OpenAI(base_url=p.url + "/v1", api_key=key, max_retries=0, timeout=30)
                        for p in cluster.procs]
        self.alive = set(range(len(cluster.procs)))
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.seq = itertools.count()
        self.concurrency = concurrency
        self.phase = "load"

    def one(self) -> None:
        i = next(self.seq)
        with self.lock:
            choices = sorted(self.alive)
        rep = choices[i % len(choices)]
        phase = self.phase
        kind = "ok"
        try:
            self.clients[rep].chat.completions.create(model="paid", messages=PROMPT, max_tokens=5)  # type: ignore[arg-type]
        except openai.RateLimitError as e:
            kind = "budget" if e.code == "budget_exceeded" else f"other:{e.code}"
        except openai.InternalServerError as e:
            kind = "unavailable" if e.status_code == 503 else f"other:{e.status_code}:{e.message[:200]}"
        except openai.APIConnectionError:
            kind = "gone"
        with self.lock:
            self.outcomes.append(Outcome(rep, kind, time.monotonic(), phase))

    def loop(self) -> None:
        while not self.stop.is_set():
            self.one()

    def served_since(self, t: float) -> int:
        with self.lock:
            return sum(1 for o in self.outcomes if o.at >= t and o.kind == "ok")

    def hold(self, n_ok: int, min_s: float, limit_s: float) -> None:
        """Keep loading until ``n_ok`` answers and ``min_s`` seconds have passed (at most ``limit_s``)."""
        t = time.monotonic()
        while time.monotonic() < t + limit_s and (self.served_since(t) < n_ok or time.monotonic() < t + min_s):
            time.sleep(0.05)

    def budget_spent(self, limit_s: float) -> None:
        """Keep loading until the last dozen answers are all budget refusals (at most ``limit_s``)."""
        end = time.monotonic() + limit_s
        while time.monotonic() < end:
            with self.lock:
                recent = [o.kind for o in self.outcomes[-12:]]
            if len(recent) == 12 and all(k == "budget" for k in recent):
                return
            time.sleep(0.1)


def run_round(cluster: Cluster, upstream: FakeOpenAI, budget: float, *, concurrency: int = 4, hold_s: float = 0.0,
              spend_limit_s: float = 30.0, log: Callable[[str], None] = lambda _m: None) -> RoundReport:
    """One round: a fresh key with ``budget``, the faults under load, the budget run out, measured."""
    cluster.replace_dead()
    key, key_id = cluster.new_key(budget)
    load = Load(cluster, key, concurrency)
    start, before = time.monotonic(), len(upstream.requests)
    killed, kill_at = len(cluster.procs) - 1, 0.0
    marks: list[PhaseMark] = []

    rkey = cluster.budget_counter(key_id)

    def phase(name: str) -> None:
        """End the current fault window and start ``name``. What the upstream received is read
        before the counter: each of those requests was admitted before the read, so a positive
        deficit is money the counter lost."""
        ended, received = load.phase, len(upstream.requests) - before
        load.phase = name
        marks.append(PhaseMark(ended, received, *cluster.counter(rkey)))
        log(name)

    with cf.ThreadPoolExecutor(concurrency) as ex:
        workers = [ex.submit(load.loop) for _ in range(concurrency)]
        try:
            load.hold(8, hold_s, 15 + hold_s)
            phase("redis restarted empty")
            cluster.redis.restart_empty()
            load.hold(8, hold_s, 15 + hold_s)
            phase("redis paused 3 s")
            cluster.redis.pause()
            time.sleep(3.0)
            cluster.redis.resume()
            load.hold(8, hold_s, 15 + hold_s)
            phase("postgres stopped 1.5 s")
            cluster.pg.stop()
            time.sleep(1.5)
            cluster.pg.start()
            load.hold(8, hold_s, 15 + hold_s)
            phase(f"replica {killed} killed")
            with load.lock:
                load.alive.discard(killed)
            kill_at = time.monotonic()
            cluster.procs[killed].proc.send_signal(signal.SIGKILL)
            load.budget_spent(spend_limit_s)
        finally:
            load.stop.set()
            for w in workers:
                w.result()
    time.sleep(cluster.flush_s + 4 * FLUSH_S)  # the live replicas write their last ledger batches
    marks.append(PhaseMark(load.phase, len(upstream.requests) - before, *cluster.counter(rkey)))
    rows, ledger_usd, one_cost = cluster.ledger(key_id)
    lost = sum(1 for o in load.outcomes if o.replica == killed
               and (o.kind == "gone" or (o.kind == "ok" and o.at >= kill_at - 3 * FLUSH_S)))
    return RoundReport(budget, len(cluster.procs), len(upstream.requests) - before, rows, ledger_usd, one_cost, lost,
                       time.monotonic() - start, Counter(o.kind for o in load.outcomes), marks, list(load.outcomes))


def measure_rate(cluster: Cluster, upstream: FakeOpenAI, concurrency: int, seconds: float) -> tuple[float, float]:
    """(answers per second, cost of one request) with an unlimited key, to size the rounds' budgets."""
    key, key_id = cluster.new_key(None)
    load = Load(cluster, key, concurrency)
    with cf.ThreadPoolExecutor(concurrency) as ex:
        workers = [ex.submit(load.loop) for _ in range(concurrency)]
        time.sleep(seconds)
        load.stop.set()
        for w in workers:
            w.result()
    time.sleep(5 * FLUSH_S)
    rows, _usd, one_cost = cluster.ledger(key_id)
    return rows / seconds, one_cost


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0, help="run rounds until this much time has passed")
    ap.add_argument("--rounds", type=int, default=0, help="or exactly this many rounds (0: by --minutes)")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=4, help="client threads")
    ap.add_argument("--hold-s", type=float, default=10.0, help="seconds of load between faults")
    ap.add_argument("--budget", type=float, default=0.0,
                    help="USD per round (0: what the measured rate spends in the four holds and 15 s more)")
    ap.add_argument("--slow-ledger-s", type=float, default=0.0,
                    help="the second replica writes its ledger rows only this often (a lagging writer; 0: every 0.2 s)")
    ap.add_argument("--json", help="write the rounds' reports here")
    args = ap.parse_args()
    if args.replicas < 2 or args.concurrency < 1 or args.hold_s < 0 or args.minutes <= 0 or args.rounds < 0:
        ap.error("need --replicas >= 2, --concurrency >= 1, --hold-s >= 0, --minutes > 0, --rounds >= 0")

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    from kaiyuan.testing.server_thread import ServerThread

    servers = ServerThread()
    upstream = FakeOpenAI(api_key="sk-upstream")
    upstream.default = Behaviour(content="fixed answer", delay_first_byte=0.02)
    url = servers.serve(upstream.app)
    reports: list[RoundReport] = []
    with tempfile.TemporaryDirectory(prefix="kaiyuan-faults-") as work:
        cluster = Cluster(url, work, args.replicas, args.slow_ledger_s)
        try:
            cluster.start()
            budget = args.budget
            if budget <= 0:
                rate, one_cost = measure_rate(cluster, upstream, args.concurrency, 5.0)
                spend_s = 4 * args.hold_s + 15  # the faults (4 holds), then about 10 s with a replica dead
                budget = max(20 * one_cost, rate * spend_s * one_cost)
                log(f"measured {rate:.1f} answers/s at ${one_cost:.4f} each: budget ${budget:.2f} per round")
            end = time.monotonic() + args.minutes * 60
            while (len(reports) < args.rounds) if args.rounds else (time.monotonic() < end):
                log(f"round {len(reports) + 1}")
                rep = run_round(cluster, upstream, budget, concurrency=args.concurrency, hold_s=args.hold_s,
                                spend_limit_s=max(30.0, 4 * args.hold_s), log=log)
                reports.append(rep)
                log(json.dumps(rep.summary()))
        finally:
            cluster.close()
            servers.close()
    total = {"rounds": len(reports), "received": sum(r.received for r in reports),
             "ledger_rows": sum(r.rows for r in reports),
             "max_overspend_requests_per_replica": max((r.over_requests_per_replica for r in reports), default=0.0),
             "rounds_with_problems": sum(1 for r in reports if r.problems())}
    print(json.dumps(total, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"total": total, "rounds": [r.summary() for r in reports]}, indent=2))
    return 1 if total["rounds_with_problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
