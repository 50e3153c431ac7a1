"""Console single sign-on against a local OIDC provider process (kaiyuan.testing.fake_oidc).

Admins and team users sign in through the provider; every broken token (another key's signature,
a wrong nonce, audience or issuer, an expired token), a user that maps to nothing, a forged state,
a wrong client secret and an unreachable provider are refused with a page that says why.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.console_seed import TEAMS
from tests.console_env import Console, start

CLIENT_ID, SECRET = "kaiyuan-console", "s3cret-client"
USERS = {
    "alice": {"claims": {"sub": "u-alice", "email": "alice@bank.example", "groups": ["staff", "kaiyuan-admins"]}},
    "bob": {"claims": {"sub": "u-bob", "email": "bob@bank.example", "kaiyuan_team": TEAMS[0]}},
    "carol": {"claims": {"sub": "u-carol", "email": "carol@bank.example", "groups": ["staff"]}},
    "dave": {"claims": {"sub": "u-dave", "email": "dave@bank.example", "kaiyuan_team": "no-such-team"}},
    **{f"eve-{t}": {"claims": {"sub": "u-eve", "groups": ["kaiyuan-admins"]}, "tamper": t}
       for t in ("signature", "nonce", "audience", "expired", "issuer")},
}


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    users = tmp_path_factory.mktemp("oidc") / "users.json"
    users.write_text(json.dumps(USERS))
    proc = subprocess.Popen([sys.executable, "-m", "kaiyuan.testing.fake_oidc", "--client-id", CLIENT_ID, "--client-secret",
                             SECRET, "--users", str(users)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ready "), line
    yield line.split()[1]
    proc.terminate()
    proc.wait(timeout=10)


def _console(make_gateway: Any, upstream: str, issuer: str, secret: str = SECRET) -> Console:
    return start(make_gateway, upstream, rows=300, oidc={"issuer": issuer, "client_id": CLIENT_ID, "client_secret": secret})


@pytest.fixture
def console(make_gateway: Any, fake_openai: Any, provider: str) -> Console:
    return _console(make_gateway, fake_openai.url, provider)


def sso(c: Console, user: str) -> tuple[httpx.Client, httpx.Response]:
    client = httpx.Client(base_url=c.url, follow_redirects=True, timeout=30)
    r = client.get(f"/ui/oidc/start?login_hint={user}&next=/ui/overview")
    return client, r


def test_login_page_offers_sso(console: Console) -> None:
    page = httpx.get(console.url + "/ui/login")
    assert 'id="sso"' in page.text


def test_an_admin_signs_in_through_the_provider(console: Console) -> None:
    client, r = sso(console, "alice")
    assert r.status_code == 200 and str(r.url).endswith("/ui/overview")
    assert "alice@bank.example · admin" in r.text
    assert client.get("/ui/trials").status_code == 200
    assert client.get("/admin/teams").status_code == 200


def test_a_team_user_signs_in_and_sees_only_the_team(console: Console) -> None:
    client, r = sso(console, "bob")
    assert r.status_code == 200 and f"team {TEAMS[0]}" in r.text
    data = client.get("/admin/requests?limit=500").json()["data"]
    assert data and {x["team_id"] for x in data} == {TEAMS[0]}
    assert client.get("/ui/trials").status_code == 403
    assert client.get("/admin/teams").status_code == 403


@pytest.mark.parametrize(("user", "why"), [
    ("carol", "neither an admin"),
    ("dave", "which this gateway does not have"),
    ("nobody", "no such user"),
    ("eve-signature", "Signature verification failed"),
    ("eve-nonce", "nonce"),
    ("eve-audience", "not valid"),
    ("eve-expired", "not valid"),
    ("eve-issuer", "not valid"),
])
def test_bad_sign_ins_are_refused(console: Console, user: str, why: str) -> None:
    client, r = sso(console, user)
    assert r.status_code == 403, r.text
    assert why in r.text
    assert client.get("/ui/overview", follow_redirects=False).status_code == 303  # no session was made


def test_a_forged_state_is_refused(console: Console) -> None:
    client = httpx.Client(base_url=console.url, follow_redirects=False, timeout=30)
    to_provider = client.get("/ui/oidc/start?login_hint=alice")
    back = httpx.get(to_provider.headers["location"], follow_redirects=False).headers["location"]
    forged = back.split("state=")[0] + "state=forged"
    r = client.get(forged)
    assert r.status_code == 403 and "start again" in r.text
    other = httpx.Client(base_url=console.url, follow_redirects=False, timeout=30)  # the code, without the flow cookie
    assert other.get(back).status_code == 403


def test_a_wrong_client_secret_is_refused(make_gateway: Any, fake_openai: Any, provider: str) -> None:
    c = _console(make_gateway, fake_openai.url, provider, secret="wrong-secret")
    _, r = sso(c, "alice")
    assert r.status_code == 403 and "refused the sign-in code" in r.text


def test_an_unreachable_provider_is_a_clear_error(make_gateway: Any, fake_openai: Any) -> None:
    from kaiyuan.testing.harness import free_port

    c = _console(make_gateway, fake_openai.url, f"http://127.0.0.1:{free_port()}")
    r = httpx.get(c.url + "/ui/oidc/start", follow_redirects=False)
    assert r.status_code == 502 and "cannot reach the identity provider" in r.text
