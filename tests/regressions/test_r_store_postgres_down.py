"""Regressions (issue 9), PostgreSQL faults, against a private real PostgreSQL this test stops:

- PostgreSQL down: clients got 500 ``OperationalError``. Now: 503 with Retry-After, in the
  caller's dialect, failing closed (a request whose spend cannot be recorded is not served).
- An upstream reporting completion_tokens = 3e9 made the ledger writer retry one batch forever;
  every later request on that replica went unrecorded. Now the row is set aside and the rows
  behind it are written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from sqlalchemy import select

from kaiyuan.context import Principal, RequestContext, Usage
from kaiyuan.store.schema import spend_ledger
from kaiyuan.testing.fake_openai import FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.conftest import openai_model
from tests.http import http
from tests.services import PrivatePostgres

MASTER = "sk-master-pg-down"


def _ledger_ids(gw: RunningGateway) -> set[str]:
    assert gw.gateway.engine is not None
    with gw.gateway.engine.connect() as c:
        return set(c.execute(select(spend_ledger.c.request_id)).scalars())


def test_postgres_down_is_a_503_with_retry_after_in_each_dialect_and_nothing_is_lost(
    make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI, tmp_path: Path,
) -> None:
    pg = PrivatePostgres()
    pg.start()
    try:
        gw = make_gateway({
            "server": {"master_key": MASTER},
            "store": {"url": pg.url},
            "accounting": {"spend_flush_interval_s": 0.2},
            "limits": {"key_cache_ttl_s": 0.3},
            "models": [openai_model("paid", fake_openai.url, "upstream-chat",  # type: ignore[attr-defined]
                                    deployment={"price": {"input": 1, "output": 2}})],
        })
        r = http("POST", gw.url + "/admin/keys", {"name": "k", "budgets": [{"period": "day", "limit_usd": 5}]}, MASTER)
        assert r.status_code == 201, r.text
        key = r.json()["key"]
        oc = openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0)
        ac = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)
        served = [oc.chat.completions.with_raw_response.create(
            model="paid", messages=[{"role": "user", "content": "before"}], max_tokens=5).headers["x-kaiyuan-request-id"]]

        pg.stop()
        time.sleep(0.6)  # the cached key expires; the ledger's next flush finds the database down
        with pytest.raises(openai.InternalServerError) as e:
            oc.chat.completions.create(model="paid", messages=[{"role": "user", "content": "down"}], max_tokens=5)
        assert e.value.status_code == 503
        assert e.value.response.headers["retry-after"].isdigit()
        err = e.value.response.json()["error"]
        assert err["type"] == "service_unavailable" and err["code"] == "store_unavailable"
        assert "OperationalError" not in e.value.response.text and "psycopg" not in e.value.response.text
        with pytest.raises(anthropic.APIStatusError) as ae:
            ac.messages.create(model="paid", max_tokens=5, messages=[{"role": "user", "content": "down"}])
        assert ae.value.status_code == 503 and ae.value.response.headers["retry-after"].isdigit()
        body = ae.value.response.json()
        assert body["type"] == "error" and body["error"]["type"] == "api_error"
        # fail closed for every billed request, even the master key's (its spend could not be recorded)
        mc = openai.OpenAI(base_url=gw.base_url, api_key=MASTER, max_retries=0)
        with pytest.raises(openai.InternalServerError):
            mc.chat.completions.create(model="paid", messages=[{"role": "user", "content": "down"}], max_tokens=5)
        # the admin API too: 503, not 500
        assert http("GET", gw.url + "/admin/keys", None, MASTER).status_code == 503

        pg.start()
        deadline = time.monotonic() + 20
        while True:
            try:
                reply = oc.chat.completions.with_raw_response.create(
                    model="paid", messages=[{"role": "user", "content": "after"}], max_tokens=5)
                served.append(reply.headers["x-kaiyuan-request-id"])
                break
            except openai.InternalServerError:
                assert time.monotonic() < deadline, "the gateway did not recover after PostgreSQL came back"
                time.sleep(0.2)
        gw.settle()
        gw.servers.call(gw.gateway.ledger.flush())
        assert set(served) <= _ledger_ids(gw)  # every request served has its ledger row
    finally:
        pg.remove()


async def test_a_3e9_token_row_is_set_aside_and_later_requests_are_recorded(tmp_path: Path) -> None:
    from kaiyuan.accounting.ledger import SpendLedger
    from kaiyuan.observability.metrics import Metrics
    from kaiyuan.store.db import open_store

    pg = PrivatePostgres()
    pg.start()
    try:
        engine = open_store(pg.url)
        m = Metrics()
        ledger = SpendLedger(engine, 60, m.store)

        def ctx(i: int, completion: int) -> RequestContext:
            c = RequestContext(f"r{i}", "openai", "chat", model="m", status=200, usage=Usage(3, completion, 0, 0))
            c.principal = Principal(key_id="k")
            return c

        ledger.record(ctx(0, 3_000_000_000), 6000.0, "up", "vendor")
        for i in range(1, 4):
            ledger.record(ctx(i, 5), 0.01, "up", "vendor")
        assert await ledger.flush() == 3
        with engine.connect() as c:
            assert set(c.execute(select(spend_ledger.c.request_id)).scalars()) == {"r1", "r2", "r3"}
        assert m.registry.get_sample_value("kaiyuan_store_rows_set_aside_total", {"writer": "spend_ledger"}) == 1
        assert ledger.writer.pending == 0
        engine.dispose()
    finally:
        pg.remove()
