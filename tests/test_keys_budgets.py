"""Virtual keys, the admin API, budgets, rate limits and cost on one node (SQLite + in-process counters)."""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Callable
from typing import Any

import openai
import pytest

from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.conftest import openai_model
from tests.http import Reply, http

MASTER = "sk-master-test"
# A price that makes costs easy to check: $1 per million prompt tokens, $2 per million completion tokens.
PRICE = {"input": 1.0, "output": 2.0}


def admin(gw: RunningGateway, method: str, path: str, json: Any = None, key: str | None = MASTER, raw: bytes | None = None) -> Reply:
    return http(method, gw.url + path, json, key, raw)


def client(gw: RunningGateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0)


@pytest.fixture
def kgw(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI) -> RunningGateway:
    url = fake_openai.url  # type: ignore[attr-defined]
    return make_gateway(
        {
            "server": {"master_key": MASTER},
            "models": [
                openai_model("cheap", url, "upstream-chat", deployment={"price": PRICE}),
                openai_model("other", url, "upstream-other", deployment={"price": PRICE}),
                openai_model("unpriced", url, "no-such-model-in-catalog"),
                openai_model("emb", url, "upstream-emb", deployment={"price": PRICE}),
            ],
        }
    )


def new_key(gw: RunningGateway, **body: Any) -> dict[str, Any]:
    r = admin(gw, "POST", "/admin/keys", {"name": "k", **body})
    assert r.status_code == 201, r.text
    return r.json()


def chat(gw: RunningGateway, key: str, text: str = "hello there", model: str = "cheap", **kw: Any) -> Any:
    return client(gw, key).chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kw)


# -- auth and the admin API ------------------------------------------------------------------------
def test_admin_requires_the_master_key(kgw: RunningGateway) -> None:
    r = admin(kgw, "GET", "/admin/keys", key="wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = admin(kgw, "GET", "/admin/keys", key=None)
    assert r.status_code == 401 and "master key" in r.json()["error"]["message"]
    made = new_key(kgw)
    key = made["key"]
    r = admin(kgw, "GET", "/admin/teams", key=key)  # a virtual key is not an admin key
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
    assert admin(kgw, "POST", "/admin/keys", {"name": "x"}, key=key).status_code == 403
    mine = admin(kgw, "GET", "/admin/keys", key=key).json()["data"]  # it may read its own (team's) keys
    assert [k["id"] for k in mine] == [made["id"]]


def test_key_is_shown_once_and_stored_as_a_hash(kgw: RunningGateway) -> None:
    k = new_key(kgw, allowed_models=["cheap"])
    assert k["key"].startswith("sk-ky-") and len(k["key"]) == 49
    listed = admin(kgw, "GET", "/admin/keys").json()["data"]
    assert all("key" not in x and "key_hash" not in x for x in listed)
    got = admin(kgw, "GET", f"/admin/keys/{k['id']}").json()
    assert "key" not in got and got["key_hint"].startswith("sk-ky-") and got["status"] == "active"
    from sqlalchemy import text

    assert kgw.gateway.engine is not None
    with kgw.gateway.engine.connect() as conn:
        stored = conn.execute(text("SELECT key_hash FROM api_keys WHERE id = :i"), {"i": k["id"]}).scalar_one()
    import hashlib

    assert stored == hashlib.sha256(k["key"].encode()).hexdigest()
    r = chat(kgw, k["key"])
    assert r.choices[0].message.content == "echo: hello there"


def test_bad_keys_get_clear_401s(kgw: RunningGateway) -> None:
    with pytest.raises(openai.AuthenticationError) as e:
        chat(kgw, "sk-ky-short")
    assert "invalid API key" in str(e.value)
    with pytest.raises(openai.AuthenticationError):
        chat(kgw, "sk-ky-" + "A" * 43)  # well-formed but unknown
    k = new_key(kgw)
    assert admin(kgw, "POST", f"/admin/keys/{k['id']}/revoke").json()["status"] == "revoked"
    with pytest.raises(openai.AuthenticationError) as e:
        chat(kgw, k["key"])
    assert e.value.code == "key_revoked"
    # Expiry without sleeping: a key that works until an admin moves its expiry into the past
    # (the guard's cached record must be dropped), and a key created already expired.
    k2 = new_key(kgw, expires_in_s=3600)
    chat(kgw, k2["key"])
    past = time.time() - 60
    assert admin(kgw, "PATCH", f"/admin/keys/{k2['id']}", {"expires_at": past}).json()["status"] == "expired"
    with pytest.raises(openai.AuthenticationError) as e:
        chat(kgw, k2["key"])
    assert e.value.code == "key_expired" and "expired at" in str(e.value)
    k3 = new_key(kgw, expires_at=past)
    assert k3["status"] == "expired"
    with pytest.raises(openai.AuthenticationError) as e:
        chat(kgw, k3["key"])
    assert e.value.code == "key_expired"


def test_bad_admin_input_is_rejected_and_nothing_is_written(kgw: RunningGateway) -> None:
    r = admin(kgw, "POST", "/admin/keys", {"name": "x", "allowed_models": ["cheap", "gpt-9"]})
    assert r.status_code == 400 and "gpt-9" in r.json()["error"]["message"]
    r = admin(kgw, "POST", "/admin/keys", {"name": "x", "budgets": [{"period": "month", "limit_usd": -1}]})
    assert r.status_code == 400 and "limit_usd" in r.json()["error"]["message"]
    r = admin(kgw, "POST", "/admin/keys", {"name": "x", "budgets": [{"period": "fortnight", "limit_usd": 1}]})
    assert r.status_code == 400
    r = admin(kgw, "POST", "/admin/keys", {"name": "x", "team_id": "team_nope"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "team_not_found"
    assert admin(kgw, "GET", "/admin/keys").json()["data"] == []
    k = new_key(kgw)
    r = admin(kgw, "POST", "/admin/budgets", {"scope": "key", "scope_id": k["id"], "period": "day", "limit_usd": -5})
    assert r.status_code == 400
    r = admin(kgw, "POST", "/admin/budgets", {"scope": "team", "scope_id": "team_nope", "period": "day", "limit_usd": 5})
    assert r.status_code == 400
    assert admin(kgw, "GET", "/admin/budgets").json()["data"] == []
    r = admin(kgw, "POST", "/admin/teams", {"name": "t", "allowed_models": ["nope"]})
    assert r.status_code == 400
    assert admin(kgw, "POST", "/admin/teams", {"name": "t"}).status_code == 201
    assert admin(kgw, "POST", "/admin/teams", {"name": "t"}).status_code == 409
    r = admin(kgw, "POST", "/admin/teams", raw=b"{nope")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert admin(kgw, "GET", "/admin/keys/key_nope").status_code == 404


def test_allowed_models_and_policy(kgw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    team = admin(kgw, "POST", "/admin/teams", {"name": "research", "allowed_models": ["cheap", "other"], "policy": "!vendor:nobody"}).json()
    k = new_key(kgw, team_id=team["id"], allowed_models=["cheap", "emb"])  # intersect: cheap only
    seen: list[Any] = []
    kgw.gateway.on_complete.append(lambda ctx: seen.append(ctx.principal))
    chat(kgw, k["key"])
    with pytest.raises(openai.PermissionDeniedError) as e:
        chat(kgw, k["key"], model="other")
    assert e.value.code == "model_not_allowed"
    models = [m.id for m in client(kgw, k["key"]).models.list()]
    assert models == ["cheap"]
    assert seen[0].policy == "!vendor:nobody" and seen[0].team_id == team["id"] and seen[0].key_id == k["id"]


def test_rotation_old_secret_stops_working(kgw: RunningGateway) -> None:
    k = new_key(kgw)
    chat(kgw, k["key"])
    r = admin(kgw, "POST", f"/admin/keys/{k['id']}/rotate")
    assert r.status_code == 200
    new = r.json()["key"]
    assert new != k["key"] and r.json()["id"] == k["id"]
    with pytest.raises(openai.AuthenticationError):
        chat(kgw, k["key"])
    chat(kgw, new)


def test_concurrent_rotation_exactly_one_wins(kgw: RunningGateway) -> None:
    k = new_key(kgw)
    with cf.ThreadPoolExecutor(6) as ex:
        results = list(ex.map(lambda _: admin(kgw, "POST", f"/admin/keys/{k['id']}/rotate"), range(6)))
    ok = [r for r in results if r.status_code == 200]
    conflicts = [r for r in results if r.status_code == 409]
    assert len(ok) + len(conflicts) == 6 and len(ok) >= 1
    for r in conflicts:
        assert r.json()["error"]["code"] == "key_conflict"
    # The secret that works is the one the last winner was given; every other one fails.
    got = admin(kgw, "GET", f"/admin/keys/{k['id']}").json()
    assert got["version"] == 1 + len(ok)
    working = [r.json()["key"] for r in ok if _works(kgw, r.json()["key"])]
    assert len(working) == 1 and working[0][-4:] == got["key_hint"][-4:]


def _works(gw: RunningGateway, key: str) -> bool:
    try:
        chat(gw, key)
        return True
    except openai.AuthenticationError:
        return False


# -- cost ------------------------------------------------------------------------------------------
def test_cost_on_every_request_and_unknown_price_is_none(kgw: RunningGateway) -> None:
    chat(kgw, MASTER, "one two three")
    chat(kgw, MASTER, "one two three", model="unpriced")
    rows = kgw.log_rows()
    priced, unpriced = rows[-2], rows[-1]
    # fake usage: prompt = 3 words + 3, completion = "echo: one two three" = 4 words; half the prompt cached
    expected = (6 * 1.0 + 4 * 2.0) / 1e6
    assert priced["cost_usd"] == pytest.approx(expected)
    assert unpriced["cost_usd"] is None


def test_unpriced_model_refused_for_keys_with_budgets(kgw: RunningGateway) -> None:
    k = new_key(kgw, budgets=[{"period": "month", "limit_usd": 10}])
    with pytest.raises(openai.PermissionDeniedError) as e:
        chat(kgw, k["key"], model="unpriced")
    assert e.value.code == "price_unknown"
    nb = new_key(kgw)
    chat(kgw, nb["key"], model="unpriced")  # no budget: allowed, cost unknown


# -- budgets ---------------------------------------------------------------------------------------
def _fire(gw: RunningGateway, key: str, n: int, stream_every: int = 3) -> list[Any]:
    def one(i: int) -> Any:
        try:
            if i % stream_every == 0:
                s = chat(gw, key, f"request number {i}", max_tokens=20, stream=True)
                return "".join(c.choices[0].delta.content or "" for c in s if c.choices)
            return chat(gw, key, f"request number {i}", max_tokens=20)
        except openai.RateLimitError as e:
            return e

    with cf.ThreadPoolExecutor(8) as ex:
        return list(ex.map(one, range(n)))


def test_budget_holds_exactly_under_concurrency(kgw: RunningGateway) -> None:
    # worst case per request: ~10 prompt tokens * $1/M + 20 * $2/M = ~$0.00005; allow a handful
    limit = 0.0002
    k = new_key(kgw, budgets=[{"period": "day", "limit_usd": limit}])
    results = _fire(kgw, k["key"], 40)
    denied = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert denied and len(denied) < 40
    msg = str(denied[0])
    assert denied[0].code == "budget_exceeded"
    assert "daily budget" in msg and "is $0.0002;" in msg and "resets at" in msg and "spent $0.0" in msg
    assert denied[0].response.headers.get("Retry-After")
    rows = [r for r in kgw.log_rows() if r["key_id"] == k["id"]]
    spent = sum(r["cost_usd"] for r in rows if r["cost_usd"])
    assert 0 < spent <= limit
    # the ledger holds exactly what the request log holds
    ledger = _ledger_total(kgw, k["id"])
    assert round(ledger, 2) == round(spent, 2) and ledger == pytest.approx(spent, abs=1e-12)
    status = admin(kgw, "GET", f"/admin/keys/{k['id']}").json()["budgets"][0]
    assert status["spent_usd"] == pytest.approx(spent, abs=1e-9) and status["reserved_usd"] == 0
    assert status["resets_at"] > time.time()


def _ledger_total(gw: RunningGateway, key_id: str) -> float:
    from sqlalchemy import func, select

    from kaiyuan.store.schema import spend_ledger

    gw.servers.call(gw.gateway.ledger.flush())
    assert gw.gateway.engine is not None
    with gw.gateway.engine.connect() as conn:
        return float(conn.execute(select(func.sum(spend_ledger.c.cost_usd)).where(spend_ledger.c.key_id == key_id)).scalar_one() or 0)


def test_team_budget_is_shared_by_its_keys(kgw: RunningGateway) -> None:
    team = admin(kgw, "POST", "/admin/teams", {"name": "shared"}).json()
    r = admin(kgw, "POST", "/admin/budgets", {"scope": "team", "scope_id": team["id"], "period": "total", "limit_usd": 0.00015})
    assert r.status_code == 201
    a = new_key(kgw, team_id=team["id"])["key"]
    b = new_key(kgw, team_id=team["id"])["key"]
    results = _fire(kgw, a, 10) + _fire(kgw, b, 10)
    denied = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert denied and "total budget of team" in str(denied[-1]) and "does not reset" in str(denied[-1])
    rows = [r for r in kgw.log_rows() if r["team_id"] == team["id"]]
    assert sum(r["cost_usd"] or 0 for r in rows) <= 0.00015


def test_failed_upstream_releases_the_reservation(kgw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    k = new_key(kgw, budgets=[{"period": "month", "limit_usd": 0.00006}])
    fake_openai.next(*[Behaviour(status=400, error_message="bad") for _ in range(5)])
    for _ in range(5):
        with pytest.raises(openai.BadRequestError):
            chat(kgw, k["key"], max_tokens=20)
    chat(kgw, k["key"], max_tokens=20)  # the failures cost nothing and hold nothing


# -- rate limits -----------------------------------------------------------------------------------
def test_rpm_limit(kgw: RunningGateway) -> None:
    k = new_key(kgw, rpm=3)
    results = _fire(kgw, k["key"], 8)
    denied = [r for r in results if isinstance(r, openai.RateLimitError)]
    # a minute boundary inside the burst could allow one more window's worth
    assert len(denied) in (5, 2)
    assert denied[0].code == "rpm_limit_exceeded" and "limit 3 per minute" in str(denied[0])


def test_tpm_and_parallel_limits(kgw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    k = new_key(kgw, tpm=30)
    with pytest.raises(openai.RateLimitError) as e:
        chat(kgw, k["key"], "word " * 200)
    assert e.value.code == "tpm_limit_exceeded"
    chat(kgw, k["key"], "short", max_tokens=5)  # TPM reserves the output cap too: a small cap fits
    p = new_key(kgw, max_parallel=1)
    fake_openai.default = Behaviour(delay_first_byte=0.3)
    try:
        results = _fire(kgw, p["key"], 4, stream_every=99)
    finally:
        fake_openai.default = Behaviour()
    denied = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert denied and all(d.code == "parallel_limit_exceeded" for d in denied)


def test_embeddings_and_completions_are_guarded_too(kgw: RunningGateway) -> None:
    k = new_key(kgw, budgets=[{"period": "day", "limit_usd": 0.000001}])
    c = client(kgw, k["key"])
    with pytest.raises(openai.RateLimitError):
        c.completions.create(model="cheap", prompt="hello " * 50, max_tokens=100)
    e = new_key(kgw, rpm=1)
    client(kgw, e["key"]).embeddings.create(model="emb", input="hello")
    with pytest.raises(openai.RateLimitError):
        client(kgw, e["key"]).embeddings.create(model="emb", input="hello")


# -- reports ---------------------------------------------------------------------------------------
def test_spend_report_csv_and_savings(kgw: RunningGateway) -> None:
    team = admin(kgw, "POST", "/admin/teams", {"name": "r"}).json()
    k = new_key(kgw, team_id=team["id"])
    for _ in range(3):
        chat(kgw, k["key"], "a b c")
    chat(kgw, k["key"], "a b c", model="other")
    r = admin(kgw, "GET", "/admin/spend?group_by=model,team,day&reference=gpt-4o")
    assert r.status_code == 200, r.text
    rep = r.json()
    by_model = {row["model"]: row for row in rep["data"]}
    assert by_model["cheap"]["requests"] == 3 and by_model["other"]["requests"] == 1
    assert by_model["cheap"]["team"] == team["id"]
    assert rep["total"]["reference_cost_usd"] > rep["total"]["cost_usd"] > 0
    assert rep["total"]["savings_usd"] == pytest.approx(rep["total"]["reference_cost_usd"] - rep["total"]["cost_usd"], abs=1e-6)
    csv = admin(kgw, "GET", "/admin/spend?group_by=vendor&format=csv")
    assert csv.headers["content-type"].startswith("text/csv")
    lines = csv.text.strip().splitlines()
    assert lines[0].startswith("vendor,requests,prompt_tokens,completion_tokens,cost_usd") and len(lines) == 2
    assert admin(kgw, "GET", "/admin/spend?group_by=colour").status_code == 400
    assert admin(kgw, "GET", "/admin/spend?reference=no-such-model").status_code == 400


# -- CLI -------------------------------------------------------------------------------------------
def test_cli_keys_teams_budgets_spend(kgw: RunningGateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import json as jsonlib

    from kaiyuan.cli import main

    monkeypatch.setenv("KAIYUAN_URL", kgw.url)
    monkeypatch.setenv("KAIYUAN_MASTER_KEY", MASTER)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, _ = run("teams", "create", "--name", "cli-team", "--rpm", "100", "--json")
    assert code == 0
    team = jsonlib.loads(out)
    code, out, _ = run("keys", "create", "--name", "cli", "--team", team["id"], "--models", "cheap", "--budget", "month=5", "--expires-in", "30d", "--json")
    assert code == 0
    key = jsonlib.loads(out)
    assert key["key"].startswith("sk-ky-") and key["budgets"][0]["limit_usd"] == 5 and key["expires_at"] > time.time() + 29 * 86400
    chat(kgw, key["key"])
    code, out, _ = run("keys", "list")
    assert code == 0 and key["id"] in out and "sk-ky-" in out and key["key"] not in out
    code, out, _ = run("budgets", "set", "--team", team["id"], "--period", "day", "--limit", "2")
    assert code == 0
    code, out, _ = run("spend", "--by", "key,model", "--reference", "gpt-4o")
    assert code == 0 and key["id"] in out and "savings_usd" in out
    code, out, _ = run("spend", "--by", "day", "--csv")
    assert code == 0 and out.startswith("day,requests,")
    code, _, err = run("keys", "create", "--name", "x", "--models", "nope")
    assert code == 1 and "400" in err and "nope" in err
    code, _, err = run("keys", "revoke", key["id"], "--master-key", "wrong")
    assert code == 1 and "401" in err
    code, out, _ = run("keys", "revoke", key["id"], "--json")
    assert code == 0 and jsonlib.loads(out)["status"] == "revoked"


def test_broken_stream_without_usage_is_charged_its_worst_case(kgw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    k = new_key(kgw, budgets=[{"period": "month", "limit_usd": 1}])
    fake_openai.next(Behaviour(drop_after_chunks=2))
    with pytest.raises(openai.APIError):
        s = chat(kgw, k["key"], "tell me more", max_tokens=50, stream=True)
        for _ in s:
            pass
    row = [r for r in kgw.log_rows() if r["key_id"] == k["id"]][-1]
    assert row["status"] >= 500 and row["completion_tokens"] is None
    # no usage came back but bytes went out: charged prompt estimate + 50 output tokens, never less
    assert row["cost_usd"] is not None and row["cost_usd"] >= 50 * 2.0 / 1e6
    assert _ledger_total(kgw, k["id"]) == pytest.approx(row["cost_usd"])


def test_team_rate_limit_is_shared_by_its_keys(kgw: RunningGateway) -> None:
    team = admin(kgw, "POST", "/admin/teams", {"name": "rl", "rpm": 2}).json()
    a = new_key(kgw, team_id=team["id"])["key"]
    b = new_key(kgw, team_id=team["id"])["key"]
    outcomes = []
    for key in (a, b, a, b):
        try:
            chat(kgw, key)
            outcomes.append("ok")
        except openai.RateLimitError as e:
            outcomes.append(str(e.code))
            assert f"team:{team['id']}" in str(e)
    assert outcomes.count("rpm_limit_exceeded") >= 1 and outcomes[:2] == ["ok", "ok"]


def test_period_bounds_are_utc_calendar_periods() -> None:
    from datetime import UTC, datetime

    from kaiyuan.accounting.keystore import period_bounds

    t = datetime(2026, 2, 26, 15, 30, tzinfo=UTC).timestamp()  # a Thursday
    assert period_bounds("day", t) == (datetime(2026, 2, 26, tzinfo=UTC).timestamp(), datetime(2026, 2, 27, tzinfo=UTC).timestamp())
    assert period_bounds("week", t) == (datetime(2026, 2, 23, tzinfo=UTC).timestamp(), datetime(2026, 3, 2, tzinfo=UTC).timestamp())
    assert period_bounds("month", t) == (datetime(2026, 2, 1, tzinfo=UTC).timestamp(), datetime(2026, 3, 1, tzinfo=UTC).timestamp())
    assert period_bounds("total", t) == (0.0, None)


def test_period_bounds_move_with_the_clock_across_a_boundary() -> None:
    """The current period's bounds are remembered; a time outside them (later or earlier) is worked out anew."""
    from datetime import UTC, datetime

    from kaiyuan.accounting.keystore import period_bounds

    feb = datetime(2026, 2, 28, 23, 59, 59, tzinfo=UTC).timestamp()
    mar = datetime(2026, 3, 1, 0, 0, 0, tzinfo=UTC).timestamp()
    feb_bounds = (datetime(2026, 2, 1, tzinfo=UTC).timestamp(), mar)
    mar_bounds = (mar, datetime(2026, 4, 1, tzinfo=UTC).timestamp())
    assert period_bounds("month", feb) == feb_bounds
    assert period_bounds("month", mar) == mar_bounds
    assert period_bounds("month", feb) == feb_bounds
    assert period_bounds("day", mar) == (mar, datetime(2026, 3, 2, tzinfo=UTC).timestamp())
    assert period_bounds("day", mar - 1) == (datetime(2026, 2, 28, tzinfo=UTC).timestamp(), mar)


def test_budget_spend_survives_a_restart(kgw: RunningGateway) -> None:
    from kaiyuan.testing.harness import start_gateway

    k = new_key(kgw, budgets=[{"period": "week", "limit_usd": 0.0001}])
    for _ in range(20):  # one at a time until refused: then spent + one reservation > limit
        try:
            chat(kgw, k["key"], max_tokens=20)
        except openai.RateLimitError:
            break
    else:
        pytest.fail("the budget never ran out")
    spent = _ledger_total(kgw, k["id"])
    assert spent > 0
    # a fresh gateway process on the same database starts from the ledger, not from zero
    again = start_gateway(kgw.servers, kgw.config, kgw.config.store.url)
    try:
        status = http("GET", again.url + f"/admin/keys/{k['id']}", key=MASTER).json()["budgets"][0]
        assert status["spent_usd"] == pytest.approx(spent)
        with pytest.raises(openai.RateLimitError) as e:
            chat(again, k["key"], max_tokens=20)
        assert e.value.code == "budget_exceeded"
    finally:
        from tests.conftest import _stop_gateway

        _stop_gateway(kgw.servers, again)


# -- the other routes ------------------------------------------------------------------------------
def test_anthropic_messages_route_is_guarded_and_costed(kgw: RunningGateway) -> None:
    import anthropic

    k = new_key(kgw, budgets=[{"period": "day", "limit_usd": 0.0001}])
    c = anthropic.Anthropic(base_url=kgw.url, api_key=k["key"], max_retries=0)
    ok = 0
    for _ in range(20):
        try:
            c.messages.create(model="cheap", max_tokens=20, messages=[{"role": "user", "content": "hello there"}])
            ok += 1
        except anthropic.RateLimitError as e:
            assert "budget exceeded" in str(e) and "daily budget" in str(e)
            break
    assert 0 < ok < 20
    with pytest.raises(anthropic.RateLimitError):
        with c.messages.stream(model="cheap", max_tokens=20, messages=[{"role": "user", "content": "x"}]) as s:
            for _ in s:
                pass
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=kgw.url, api_key="sk-ky-bad", max_retries=0).messages.create(
            model="cheap", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    rows = [r for r in kgw.log_rows() if r["key_id"] == k["id"] and r["endpoint"] == "messages"]
    assert sum(r["cost_usd"] or 0 for r in rows) <= 0.0001 and all(r["cost_usd"] for r in rows if r["status"] == 200)


def test_key_policy_is_enforced_by_the_router(kgw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    k = new_key(kgw, policy="self_hosted")  # the fake upstream is not tagged self_hosted
    before = len(fake_openai.requests)
    with pytest.raises(openai.APIStatusError) as e:
        chat(kgw, k["key"])
    assert "self_hosted" in str(e.value) and len(fake_openai.requests) == before
    assert admin(kgw, "POST", "/admin/keys", {"name": "bad", "policy": "self hosted"}).status_code == 400


def test_models_sharing_an_upstream_keep_their_own_prices(
    make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI
) -> None:
    """Two public models on one upstream model and host (same generated deployment id) used to share
    one price: the second overwrote the first in the guard's deployment map."""
    url = fake_openai.url  # type: ignore[attr-defined]
    gw = make_gateway({
        "server": {"master_key": MASTER},
        "models": [
            openai_model("plain", url, "upstream-chat", deployment={"price": PRICE}),
            openai_model("premium", url, "upstream-chat", deployment={"price": {"input": 10.0, "output": 20.0}}),
        ],
    })
    chat(gw, MASTER, "one two three", model="plain")
    chat(gw, MASTER, "one two three", model="premium")
    plain, premium = gw.log_rows()[-2:]
    # fake usage: prompt = 3 words + 3, completion = "echo: one two three" = 4 words
    assert plain["cost_usd"] == pytest.approx((6 * 1.0 + 4 * 2.0) / 1e6)
    assert premium["cost_usd"] == pytest.approx((6 * 10.0 + 4 * 20.0) / 1e6)
    assert plain["deployment"] != premium["deployment"]
    assert premium["deployment"].endswith("#premium")
