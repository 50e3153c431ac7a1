"""The console's data routes and pages over HTTP: sign-in, sessions, CSRF, scopes, refusals.

Every /ui route and every console data route is tried without credentials and across teams; the
pages' numbers are the admin API's numbers (the browser tests check the rendered DOM).
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from bench.console_seed import TEAMS
from kaiyuan.console.session import COOKIE
from tests.console_env import MASTER, Console, start
from tests.http import http

PATH_VALUES = {"id": "req-00000001-x", "name": "t1"}


@pytest.fixture
def console(make_gateway: Any, fake_openai: Any) -> Console:
    return start(make_gateway, fake_openai.url)


def _routes(c: Console, prefix: str) -> list[tuple[str, str]]:
    """Every (method, path) the app serves under ``prefix``, with sample values for path parameters."""
    from kaiyuan.server.openai_api import GATEWAY_KEY

    out = []
    for r in c.gw.servers._runners:
        if r.app is None or r.app.get(GATEWAY_KEY) is not c.gw.gateway:
            continue
        for route in r.app.router.routes():
            info = route.resource.get_info() if route.resource else {}
            path = info.get("path") or info.get("formatter")
            if path and path.startswith(prefix) and route.method != "HEAD":
                out.append((route.method, re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES.get(m.group(1), "x"), path)))
    return sorted(set(out))


PUBLIC = {("GET", "/ui/login"), ("POST", "/ui/login"), ("POST", "/ui/logout"), ("GET", "/ui/static/t1"), ("GET", "/ui"), ("GET", "/ui/")}


def test_every_console_and_admin_route_refuses_an_anonymous_caller(console: Console) -> None:
    routes = _routes(console, "/ui") + _routes(console, "/admin")
    assert ("GET", "/ui/overview") in routes and ("GET", "/admin/console/overview") in routes
    with httpx.Client(base_url=console.url, follow_redirects=False, timeout=30) as c:
        for method, path in routes:
            if (method, path) in PUBLIC:
                continue
            r = c.request(method, path)
            if path.startswith("/ui/"):
                assert r.status_code == 303 and r.headers["location"].startswith("/ui/login"), (method, path, r.status_code)
                assert "team-" not in r.text and "deepseek" not in r.text
            else:
                assert r.status_code == 401, (method, path, r.status_code, r.text)
                assert r.json()["error"]["code"] == "missing_api_key"


def test_a_forged_or_stale_session_cookie_is_refused(console: Console) -> None:
    with httpx.Client(base_url=console.url, follow_redirects=False, timeout=30) as c:
        c.cookies.set(COOKIE, "eyJzaWQiOiJ4In0.AAAA")
        assert c.get("/ui/overview").status_code == 303
        assert c.get("/admin/console/overview").status_code == 401
    s = console.session()
    good = s.cookies[COOKIE]
    body, sig = good.split(".")
    with httpx.Client(base_url=console.url, follow_redirects=False, timeout=30) as c:
        c.cookies.set(COOKIE, body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1] + "." + sig)
        assert c.get("/admin/console/overview").status_code == 401


def test_sign_in_sets_a_hardened_cookie_and_sign_out_ends_the_session(console: Console) -> None:
    c = httpx.Client(base_url=console.url, follow_redirects=False, timeout=30)
    form = c.get("/ui/login")
    token = form.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    r = c.post("/ui/login", data={"csrf": token, "key": MASTER, "next": "/ui/keys"})
    assert r.status_code == 303 and r.headers["location"] == "/ui/keys"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    page = c.get("/ui/overview")
    assert page.status_code == 200 and "Content-Security-Policy" in page.headers
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    stolen = c.cookies[COOKIE]
    assert c.post("/ui/logout", data={"csrf": "wrong"}).status_code == 403  # sign-out is a form too
    assert c.post("/ui/logout", data={"csrf": csrf}).status_code == 303
    with httpx.Client(base_url=console.url, follow_redirects=False, timeout=30) as other:
        other.cookies.set(COOKIE, stolen)  # the signed-out cookie, replayed
        assert other.get("/ui/overview").status_code == 303
        assert other.get("/admin/console/overview").status_code == 401


def test_sign_in_refuses_bad_keys_and_forms_without_the_token(console: Console) -> None:
    c = httpx.Client(base_url=console.url, follow_redirects=False, timeout=30)
    form = c.get("/ui/login")
    token = form.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    r = c.post("/ui/login", data={"csrf": token, "key": "sk-ky-not-a-real-key"})
    assert r.status_code == 401 and COOKIE not in r.cookies
    assert c.post("/ui/login", data={"csrf": "forged", "key": MASTER}).status_code == 403
    fresh = httpx.Client(base_url=console.url, follow_redirects=False, timeout=30)  # no login cookie: cross-site post
    assert fresh.post("/ui/login", data={"csrf": token, "key": MASTER}).status_code == 403
    assert c.post("/ui/login", data={"csrf": token, "key": ""}).status_code == 401
    r = c.post("/ui/login", data={"csrf": token, "key": MASTER, "next": "https://evil.example/"})
    assert r.headers["location"] == "/ui/overview"  # no open redirect


def test_changes_from_a_session_need_the_csrf_token(console: Console) -> None:
    s = console.session()
    r = s.post("/admin/teams", json={"name": "no-token"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed"
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', s.get("/ui/keys").text).group(1)  # type: ignore[union-attr]
    r = s.post("/admin/teams", json={"name": "with-token"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 201, r.text
    assert s.post("/admin/teams", json={"name": "bad"}, headers={"X-CSRF-Token": csrf + "x"}).status_code == 403


def test_a_team_key_sees_only_its_own_team(console: Console) -> None:
    mine = console.api("GET", "/admin/requests?limit=500", key=console.team_key)["data"]
    assert mine and {r["team_id"] for r in mine} == {TEAMS[0]}
    widened = console.api("GET", f"/admin/requests?team_id={TEAMS[1]}&limit=500", key=console.team_key)["data"]
    assert {r["team_id"] for r in widened} <= {TEAMS[0]}
    other = console.api("GET", f"/admin/requests?team_id={TEAMS[1]}&limit=1")["data"][0]
    assert http("GET", f"{console.url}/admin/requests/{other['id']}", key=console.team_key).status_code == 404
    ov = console.api("GET", "/admin/console/overview?period=7d", key=console.team_key)
    assert [t["name"] for t in ov["shares"]["team"]] == [TEAMS[0]]
    admin_ov = console.api("GET", f"/admin/console/overview?period=7d&team_id={TEAMS[0]}")
    assert ov["totals"] == admin_ov["totals"]
    keys = console.api("GET", "/admin/keys", key=console.team_key)["data"]
    assert keys and {k["team_id"] for k in keys} == {TEAMS[0]}
    for method, path in [("POST", "/admin/keys"), ("GET", "/admin/teams"), ("GET", "/admin/budgets"), ("GET", "/admin/spend"),
                         ("GET", "/admin/trials"), ("GET", "/admin/deployments"), ("POST", "/admin/trials/x/promote")]:
        r = http(method, console.url + path, key=console.team_key, json={} if method == "POST" else None)
        assert r.status_code == 403, (path, r.status_code, r.text)


def test_a_team_session_cannot_open_another_teams_pages(console: Console) -> None:
    s = console.session(console.team_key)
    other = console.api("GET", f"/admin/requests?team_id={TEAMS[1]}&limit=1")["data"][0]
    assert s.get(f"/ui/requests/{other['id']}").status_code == 404
    assert s.get("/ui/trials").status_code == 403
    page = s.get("/ui/traffic?period=7d&status=error")
    assert page.status_code == 200 and TEAMS[1] not in page.text and TEAMS[2] not in page.text
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    r = s.post("/admin/keys", json={"name": "sneaky"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 403


def test_a_revoked_key_loses_its_console_session(console: Console) -> None:
    s = console.session(console.team_key)
    assert s.get("/ui/overview").status_code == 200
    console.api("POST", f"/admin/keys/{console.team_key_id}/revoke")
    assert s.get("/ui/overview").status_code == 303
    assert http("GET", console.url + "/admin/console/overview", key=console.team_key).status_code == 401


def test_admin_scoped_keys_are_admins(console: Console) -> None:
    key = console.api("POST", "/admin/keys", json={"name": "ops", "admin": True})["key"]
    assert len(console.api("GET", "/admin/teams", key=key)["data"]) >= len(TEAMS)
    assert console.session(key).get("/ui/trials").status_code == 200


def test_bad_queries_get_clear_errors(console: Console) -> None:
    for path, word in [("/admin/console/overview?period=1y", "period"), ("/admin/console/traffic?period=", "period"),
                       ("/admin/requests?status=abc", "status"), ("/admin/requests?limit=0", "limit"),
                       ("/admin/requests?before=yesterday", "before")]:
        r = http("GET", console.url + path, key=MASTER)
        assert r.status_code == 400 and word in r.json()["error"]["message"], (path, r.text)
    assert http("GET", console.url + "/admin/requests/nope", key=MASTER).status_code == 404


def test_overview_numbers_match_the_log(console: Console) -> None:
    """The rollup's sums equal the log's own sums (SQL over request_log) for the same hours."""
    from sqlalchemy import func, select

    from kaiyuan.store.schema import request_log as t

    ov = console.api("GET", "/admin/console/overview?period=30d")
    assert console.gw.gateway.engine is not None
    with console.gw.gateway.engine.connect() as conn:
        n, pt, ct, cost = conn.execute(select(func.count(), func.sum(t.c.prompt_tokens), func.sum(t.c.completion_tokens),
                                              func.sum(t.c.cost_usd)).where(t.c.ts >= ov["since"])).one()
        by_model = dict(conn.execute(select(t.c.model, func.count()).where(t.c.ts >= ov["since"]).group_by(t.c.model)).all())
    assert ov["totals"]["requests"] == n
    assert ov["totals"]["tokens"] == pt + ct
    assert ov["totals"]["cost_usd"] == pytest.approx(cost, abs=1e-5)
    assert {s["name"]: s["requests"] for s in ov["shares"]["model"]} == by_model
    assert sum(p["requests"] for p in ov["series"]) == n
    origins = {s["name"] for s in ov["shares"]["origin"]}
    assert origins == {"closed, hosted", "open-weight, hosted", "open-weight, self-hosted"}
    sv = ov["savings"]
    assert sv["available"] and sv["reference_model"] == "gpt-4o" and "Method" not in sv["method"]
    assert sv["reference_usd"] > sv["actual_usd"]


def test_traffic_percentiles_are_within_the_stated_bound(console: Console) -> None:
    from sqlalchemy import select

    from kaiyuan.store.schema import request_log as t

    tr = console.api("GET", "/admin/console/traffic?period=30d")
    row = next(d for d in tr["by_deployment"] if d["model"] == "deepseek-chat")
    assert console.gw.gateway.engine is not None
    with console.gw.gateway.engine.connect() as conn:
        lat = sorted(v for (v,) in conn.execute(select(t.c.latency_ms).where(t.c.model == "deepseek-chat", t.c.status < 400,
                                                                               t.c.ts >= tr["since"])))
    exact_p50 = lat[max(0, -(-len(lat) // 2) - 1)]
    assert abs(row["latency_p50_ms"] - exact_p50) <= exact_p50 * tr["percentile_error_bound"] + 0.1
    assert {e["kind"] for e in tr["errors_by_kind"]} <= {"rate_limited", "upstream_error", "upstream_timeout", "invalid_request"}
    assert sum(e["requests"] for e in tr["errors_by_kind"]) == sum(d["errors"] for d in tr["by_deployment"])


def test_console_off_without_a_master_key(make_gateway: Any, fake_openai: Any) -> None:
    gw = make_gateway({"models": [{"name": "m", "deployments": [{"provider": "openai_compatible", "base_url": fake_openai.url + "/v1", "model": "m"}]}]})
    with httpx.Client(base_url=gw.url, follow_redirects=False, timeout=30) as c:
        assert c.get("/ui/login").status_code == 403
        assert c.get("/ui/overview").status_code == 403
        assert c.get("/admin/console/overview").status_code == 403
