"""Issue 9, section 3 (auth): each finding, replayed against a real gateway on 127.0.0.1.

- an empty master key (a ``${VAR}`` set to "") made ``x-api-key: \\u00a0`` an admin key;
- with no master key, /admin/trials and /admin/deployments were open to anyone;
- invalid UTF-8 in an auth header gave a 500;
- the body was read (and parsed) before the caller was authenticated;
- ``/v1/models/{id}`` answered anyone, and named models the key may not use.
"""

from __future__ import annotations

import http.client
import logging
from typing import Any
from urllib.parse import urlsplit

import openai
import orjson
import pytest

from kaiyuan.config import ConfigError, parse_config
from kaiyuan.server.app import warn_if_open
from kaiyuan.testing.fake_openai import FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.conftest import openai_model

MASTER = "sk-master-regression"
CHAT = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
MESSAGES = b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}'


def _raw(gw: RunningGateway, method: str, path: str, body: bytes | None, headers: dict[str, bytes]) -> tuple[int, Any]:
    """One request with header values as raw bytes (what an attacker can send, not what an SDK will)."""
    u = urlsplit(gw.url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=20)
    try:
        conn.putrequest(method, path)
        for k, v in {"Content-Type": b"application/json", **headers}.items():
            conn.putheader(k, v)
        conn.putheader("Content-Length", str(len(body or b"")).encode())
        conn.endheaders(body or b"")
        r = conn.getresponse()
        return r.status, orjson.loads(r.read() or b"null")
    finally:
        conn.close()


@pytest.mark.parametrize("value", ["", "   ", "\u00a0", "\t\u00a0 "])
def test_an_empty_or_blank_master_key_refuses_to_start(value: str) -> None:
    cfg = {"server": {"master_key": "${ADMIN_KEY}"}, "models": [openai_model("m", "http://127.0.0.1:9")]}
    with pytest.raises(ConfigError) as e:
        parse_config(cfg, "gw.yaml", env={"ADMIN_KEY": value})
    assert "server.master_key" in str(e.value) and "empty" in str(e.value)


@pytest.fixture
def keyed(make_gateway: Any, fake_openai: FakeOpenAI) -> RunningGateway:
    return make_gateway({"server": {"master_key": MASTER}, "models": [openai_model("m", fake_openai.url)]})


@pytest.mark.parametrize("header", [b"\xc2\xa0", b" ", b"\t"])
def test_a_blank_key_is_refused_in_the_callers_dialect(keyed: RunningGateway, header: bytes) -> None:
    status, err = _raw(keyed, "POST", "/v1/messages", MESSAGES, {"x-api-key": header})
    assert status == 401 and err["type"] == "error" and err["error"]["type"] == "authentication_error", err
    status, err = _raw(keyed, "POST", "/v1/chat/completions", CHAT, {"Authorization": b"Bearer " + header})
    assert status == 401 and err["error"]["code"] in ("invalid_api_key", "missing_api_key"), err
    status, err = _raw(keyed, "GET", "/admin/deployments", None, {"x-api-key": header})
    assert status == 401, err


@pytest.mark.parametrize("bad", [b"\xff\xfe", b"sk-\xc3\x28", b"\x80abc"])
def test_invalid_utf8_in_an_auth_header_is_a_401_not_a_500(keyed: RunningGateway, bad: bytes) -> None:
    status, err = _raw(keyed, "POST", "/v1/chat/completions", CHAT, {"Authorization": b"Bearer " + bad})
    assert status == 401 and err["error"]["type"] == "authentication_error", err
    status, err = _raw(keyed, "POST", "/v1/messages", MESSAGES, {"x-api-key": bad})
    assert status == 401 and err["type"] == "error" and err["error"]["type"] == "authentication_error", err
    for path in ("/admin/deployments", "/admin/keys", "/v1/models", "/v1/models/m"):
        status, err = _raw(keyed, "GET", path, None, {"Authorization": b"Bearer " + bad})
        assert status == 401, (path, err)
    # the gateway is still fine
    c = openai.OpenAI(base_url=keyed.base_url, api_key=MASTER, max_retries=0)
    assert c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}]).choices


def test_the_caller_is_authenticated_before_the_body_is_read(keyed: RunningGateway) -> None:
    status, err = _raw(keyed, "POST", "/v1/chat/completions", b"{not json", {})
    assert status == 401 and err["error"]["code"] == "missing_api_key", err
    status, err = _raw(keyed, "POST", "/v1/messages", b"[1, 2", {"x-api-key": b"wrong"})
    assert status == 401 and err["type"] == "error", err


OPEN_MODE_ADMIN = [
    ("GET", "/admin/deployments"), ("GET", "/admin/trials"), ("GET", "/admin/trials/sh"),
    ("POST", "/admin/trials/sh/promote"), ("POST", "/admin/trials/sh/rollback"), ("DELETE", "/admin/trials/sh"),
    ("POST", "/admin/trials"), ("GET", "/admin/keys"), ("POST", "/admin/keys"), ("GET", "/admin/spend"),
]


def test_open_mode_closes_every_admin_route(make_gateway: Any, fake_openai: FakeOpenAI) -> None:
    trial = {"name": "sh", "mode": "shadow", "incumbent": "m", "candidates": ["c"], "sample_rate": 0.5}
    gw = make_gateway({"models": [openai_model("m", fake_openai.url), openai_model("c", fake_openai.url)],
                       "trials": [trial]})
    for method, path in OPEN_MODE_ADMIN:
        for headers in ({}, {"Authorization": b"Bearer anything"}, {"x-api-key": b""}):
            status, err = _raw(gw, method, path, b"{}" if method == "POST" else None, headers)
            assert status == 403, (method, path, status, err)
            assert err["error"]["code"] == "admin_disabled" and "server.master_key" in err["error"]["message"]
    # the model routes stay open in open mode
    c = openai.OpenAI(base_url=gw.base_url, api_key="anything", max_retries=0)
    assert c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}]).choices


def test_admin_routes_all_use_the_master_key(keyed: RunningGateway) -> None:
    for method, path in [("GET", "/admin/deployments"), ("GET", "/admin/keys"), ("GET", "/admin/spend")]:
        assert _raw(keyed, method, path, None, {})[0] == 401
        status, err = _raw(keyed, method, path, None, {"Authorization": b"Bearer wrong"})
        assert status == 401 and err["error"]["code"] == "invalid_api_key", (path, err)
        assert _raw(keyed, method, path, None, {"Authorization": b"Bearer " + MASTER.encode()})[0] == 200, path


def test_a_warning_at_start_without_a_master_key_beyond_loopback(caplog: pytest.LogCaptureFixture) -> None:
    open_cfg = parse_config({"models": [openai_model("m", "http://127.0.0.1:9")]})
    keyed_cfg = parse_config({"server": {"master_key": MASTER}, "models": [openai_model("m", "http://127.0.0.1:9")]})
    with caplog.at_level(logging.WARNING, logger="kaiyuan.server"):
        assert warn_if_open(open_cfg, "0.0.0.0")
    assert "NO MASTER KEY" in caplog.text and "server.master_key" in caplog.text
    assert not warn_if_open(open_cfg, "127.0.0.1") and not warn_if_open(open_cfg, "::1")
    assert not warn_if_open(keyed_cfg, "0.0.0.0")


def test_retrieving_a_model_needs_the_key_and_hides_models_it_may_not_use(make_gateway: Any,
                                                                          fake_openai: FakeOpenAI) -> None:
    gw = make_gateway({"server": {"master_key": MASTER},
                       "models": [openai_model("a", fake_openai.url), openai_model("b", fake_openai.url)]})
    status, err = _raw(gw, "GET", "/v1/models/a", None, {})
    assert status == 401 and err["error"]["code"] == "missing_api_key"
    admin = openai.OpenAI(base_url=gw.base_url, api_key=MASTER, max_retries=0)
    made = admin.post("/../admin/keys", body={"name": "only-a", "allowed_models": ["a"]}, cast_to=object)
    assert isinstance(made, dict)
    c = openai.OpenAI(base_url=gw.base_url, api_key=made["key"], max_retries=0)
    assert [m.id for m in c.models.list()] == ["a"]
    assert c.models.retrieve("a").id == "a"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("b")
    assert admin.models.retrieve("b").id == "b"
    with pytest.raises(openai.PermissionDeniedError):
        c.chat.completions.create(model="b", messages=[{"role": "user", "content": "x"}])
