"""Canary splits (sticky), promote / rollback (CLI and admin API, applied by the running gateway), admin API."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from kaiyuan.cli import main
from kaiyuan.testing.fake_openai import FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from kaiyuan.trials.store import RoutingState
from tests.conftest import openai_model
from tests.test_trials_shadow import runtime_of


def gateway_with(make_gateway: Any, url: str, trial: dict[str, Any] | None = None, **server: Any) -> RunningGateway:
    t = {"name": "ca", "mode": "canary", "incumbent": "gpt-big", "candidates": ["qwen-small"], "sample_rate": 0.5,
         "prices": {"gpt-big": {"input_per_mtok": 10, "output_per_mtok": 30}, "qwen-small": {"input_per_mtok": 1, "output_per_mtok": 1}}}
    t.update(trial or {})
    cfg: dict[str, Any] = {"models": [openai_model("gpt-big", url, "big"), openai_model("qwen-small", url, "small")], "trials": [t]}
    if server:
        cfg["server"] = server
    return make_gateway(cfg)


def ask(gw: RunningGateway, text: str, user: str | None = None, key: str = "unused") -> str:
    c = openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0)
    kw = {"user": user} if user else {}
    c.chat.completions.create(model="gpt-big", messages=[{"role": "user", "content": text}], **kw)
    return ""


def upstream_models(fake: FakeOpenAI) -> list[str]:
    return [r["model"] for r in fake.requests]


def test_canary_splits_traffic_sticky_per_user(make_gateway: Any, fake_openai: FakeOpenAI) -> None:
    gw = gateway_with(make_gateway, fake_openai.url)  # type: ignore[attr-defined]
    for i in range(30):
        ask(gw, "hello", user=f"user-{i}")
    split = upstream_models(fake_openai)
    assert 5 <= split.count("small") <= 25 and split.count("big") + split.count("small") == 30
    # the same user always lands on the same arm
    for u in ("user-3", "user-7"):
        before = len(fake_openai.requests)
        for _ in range(4):
            ask(gw, "again", user=u)
        assert len(set(upstream_models(fake_openai)[before:])) == 1
    # without a user field, the conversation (first message) decides
    before = len(fake_openai.requests)
    for _ in range(3):
        ask(gw, "same conversation opener")
    assert len(set(upstream_models(fake_openai)[before:])) == 1
    rt = runtime_of(gw)
    gw.servers.call(rt.flush())
    assert rt.store is not None
    rows = rt.store.results("ca")
    assert len(rows) == 41 and {r["source"] for r in rows} == {"canary"}
    assert sum(1 for r in rows if r["candidate_ms"] is not None) == split.count("small") + sum(
        1 for m in upstream_models(fake_openai)[30:] if m == "small")
    assert rt.store.spent("ca") > 0  # the candidate arm is trial spend
    log_models = {r["model"] for r in gw.log_rows()}
    assert log_models == {"gpt-big", "qwen-small"} and all(r["trial"] == "ca" for r in gw.log_rows())


def test_promote_in_steps_and_rollback_through_the_cli(make_gateway: Any, fake_openai: FakeOpenAI, tmp_path: Path,
                                                        capsys: Any) -> None:
    gw = gateway_with(make_gateway, fake_openai.url, {"mode": "shadow", "sample_rate": 0.0})  # type: ignore[attr-defined]
    cfg = tmp_path / "k.yaml"
    cfg.write_text(yaml.safe_dump(gw.config.model_dump(mode="json", by_alias=True, exclude_none=True)))
    rt = runtime_of(gw)
    ask(gw, "before")
    assert upstream_models(fake_openai)[-1] == "big"
    assert main(["trial", "promote", "ca", "--config", str(cfg), "--note", "looks good"]) == 0
    assert "traffic now goes to qwen-small at 100%" in capsys.readouterr().out
    gw.servers.call(rt._refresh())  # what the gateway's background loop does every KAIYUAN_TRIALS_REFRESH_S
    for i in range(5):
        ask(gw, f"after {i}")
    assert upstream_models(fake_openai)[-5:] == ["small"] * 5
    assert main(["trial", "rollback", "ca", "--config", str(cfg)]) == 0
    gw.servers.call(rt._refresh())
    ask(gw, "rolled back")
    assert upstream_models(fake_openai)[-1] == "big"
    # steps: 10% now, 100% after the step interval
    assert main(["trial", "promote", "ca", "--config", str(cfg), "--steps", "10%,1", "--step-minutes", "60"]) == 0
    assert main(["trial", "promote", "ca", "--config", str(cfg), "--steps", "0.1,2"]) == 2
    assert "between 0 and 1" in capsys.readouterr().err
    gw.servers.call(rt._refresh())
    st = rt.overrides["gpt-big"]
    assert st.share() == pytest.approx(0.1) and st.share(st.ts + 3601) == 1.0
    assert main(["trial", "status", "ca", "--config", str(cfg)]) == 0
    assert "routing: last action promote to qwen-small steps [0.1, 1.0]" in capsys.readouterr().out
    assert rt.store is not None
    hist = rt.store.routing_history("ca")
    assert [h["action"] for h in hist] == ["promote", "rollback", "promote"] and hist[0]["note"] == "looks good"


def test_routing_state_steps() -> None:
    s = RoutingState("t", "promote", "a", "b", [0.1, 0.5, 1.0], 60.0, 1000.0)
    assert [s.share(t) for t in (1000, 1059, 1060, 1125, 99999)] == [0.1, 0.1, 0.5, 1.0, 1.0]
    assert RoutingState("t", "rollback", "a", "b", [0.0], 0, 0).share() == 0.0


class _Resp:
    def __init__(self, status: int, body: bytes) -> None:
        self.status_code, self.content = status, body

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode()


class Admin:
    """A tiny blocking HTTP client (stdlib) for the admin API."""

    def __init__(self, base: str) -> None:
        self.base = base

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def _do(self, method: str, path: str, headers: dict[str, str] | None = None, json_: Any = None, content: bytes | None = None) -> _Resp:
        data = json.dumps(json_).encode() if json_ is not None else content
        req = urllib.request.Request(self.base + path, data=data, method=method, headers={**(headers or {}), "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=20) as r:
                return _Resp(r.status, r.read())
        except urllib.error.HTTPError as e:
            return _Resp(e.code, e.read())

    def get(self, path: str, headers: dict[str, str] | None = None) -> _Resp:
        return self._do("GET", path, headers)

    def delete(self, path: str, headers: dict[str, str] | None = None) -> _Resp:
        return self._do("DELETE", path, headers)

    def post(self, path: str, headers: dict[str, str] | None = None, json: Any = None, content: bytes | None = None) -> _Resp:
        return self._do("POST", path, headers, json, content)


def test_admin_api(make_gateway: Any, fake_openai: FakeOpenAI) -> None:
    gw = gateway_with(make_gateway, fake_openai.url, master_key="mk")  # type: ignore[attr-defined]
    h = {"Authorization": "Bearer mk"}
    with Admin(gw.url) as c:
        r = c.get("/admin/trials")
        assert r.status_code == 401 and "master key" in r.json()["error"]["message"]
        assert c.get("/admin/trials", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = c.get("/admin/trials", headers=h)
        assert r.status_code == 200 and [t["name"] for t in r.json()["data"]] == ["ca"]
        bad = {"name": "sh2", "incumbent": "gpt-big", "candidates": ["nope"]}
        r = c.post("/admin/trials", headers=h, json=bad)
        assert r.status_code == 400 and "unknown model 'nope'" in r.json()["error"]["message"]
        r = c.post("/admin/trials", headers=h, content=b"{not json")
        assert r.status_code == 400
        r = c.post("/admin/trials", headers=h, json={"name": "sh2", "incumbent": "gpt-big", "candidates": ["qwen-small"], "sample_rate": 2})
        assert r.status_code == 400 and "sample_rate" in r.json()["error"]["message"]
        r = c.post("/admin/trials", headers=h, json={"name": "sh2", "mode": "shadow", "incumbent": "gpt-big",
                                                      "candidates": ["qwen-small"], "sample_rate": 1.0})
        assert r.status_code == 201
        ask(gw, "mirrored please", key="mk")
        rt = runtime_of(gw)
        import time

        deadline = time.monotonic() + 15
        while rt.counters["sh2"]["results"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        r = c.get("/admin/trials/sh2", headers=h)
        assert r.status_code == 200
        rep = r.json()
        assert rep["results"] >= 1 and rep["live"]["source"] == "admin"
        assert "<svg" in c.get("/admin/trials/sh2/report.html", headers=h).text
        assert c.get("/admin/trials/none", headers=h).status_code == 404
        r = c.post("/admin/trials/ca/promote", headers=h, json={"steps": [0.5, 7]})
        assert r.status_code == 400
        r = c.post("/admin/trials/ca/promote", headers=h, json={"steps": [1.0]})
        assert r.status_code == 200 and r.json()["share_now"] == 1.0
        ask(gw, "promoted", key="mk")
        assert upstream_models(fake_openai)[-1] == "small"
        assert c.post("/admin/trials/ca/rollback", headers=h).status_code == 200
        ask(gw, "rolled back", user="u-any", key="mk")
        assert c.delete("/admin/trials/ca", headers=h).status_code == 400  # defined in the config file
        assert c.delete("/admin/trials/sh2", headers=h).status_code == 200
        assert [t["name"] for t in c.get("/admin/trials", headers=h).json()["data"]] == ["ca"]
