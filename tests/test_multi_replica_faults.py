"""Three gateway processes sharing a private PostgreSQL and a private Redis, under load, through
faults: Redis restarted empty, Redis paused (SIGSTOP) and resumed, PostgreSQL stopped and
started, and a replica killed (SIGKILL). Then the load runs the shared budget out. One replica's
ledger writer lags (it writes every 3 s), so the budget counter Redis lost must be rebuilt without
counting on other replicas' rows being written in time.

What must hold (issue 9):
- overspend: the upstream's bill (requests it received x the cost of one) is at most the budget
  plus one request's cost per replica;
- every request the upstream received has a ledger row, except what a SIGKILL can lose: the
  killed replica's requests in flight and its rows queued for at most one flush interval;
- no client ever sees a 500.

The fake upstream counts what it received. Each request costs the same (same prompt length, fixed
answer), so the bill is count x cost. The scenario is ``bench/faults.py``'s, one short round of it;
that benchmark runs it for minutes and reports the numbers (bench/RESULTS.md).
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.faults import Cluster, run_round
from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI

N_REPLICAS = 3
# One replica writes its ledger rows only every 3 s: what a loaded machine or a slow database does
# now and then, made (nearly) certain. A seed that waited one flush interval for the other
# replicas' rows overspent 1 run in 4 on a loaded machine ($1.566 on $1.50) and about 9 in 10 with
# this lag; the bound must hold by design, whatever the timing.
SLOW_LEDGER_S = 3.0
# That replica also keeps serving through a short PostgreSQL outage (its ledger fails closed at its
# next flush), so the budget is larger than the $1.50 it was, to last until after the SIGKILL.
BUDGET = 2.50


def test_budget_and_ledger_hold_through_redis_postgres_and_replica_faults(fake_openai: FakeOpenAI,
                                                                          tmp_path: Path) -> None:
    fake_openai.default = Behaviour(content="fixed answer", delay_first_byte=0.02)
    cluster = Cluster(fake_openai.url, str(tmp_path), N_REPLICAS, SLOW_LEDGER_S)  # type: ignore[attr-defined]
    try:
        cluster.start()
        report = run_round(cluster, fake_openai, BUDGET)
    finally:
        cluster.close()
    # no client saw a 500; the budget was reached; the upstream's bill is at most the budget plus one
    # request per replica; every request it received has a ledger row but what the SIGKILL took
    assert report.problems() == [], report.summary()
    assert report.outcomes["ok"] > 0 and report.one_cost > 0 and report.received > 0
    if os.environ.get("KAIYUAN_FAULTS_VERBOSE"):
        print(report.summary())
