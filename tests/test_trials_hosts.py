"""Deployment-level arms: a trial compares two hosts (deployments) of one model, end to end through
a real gateway to fake upstreams; with the arm syntax's bad inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from kaiyuan.cli import main
from kaiyuan.config import ConfigError, parse_config
from kaiyuan.testing.fake_quiz import FakeQuiz, quiz_items
from kaiyuan.testing.server_thread import ServerThread


@pytest.fixture
def quiz(servers: ServerThread) -> Any:
    fake = FakeQuiz({"qwen-fp8": 0.9, "qwen-int4": 0.6}, api_key="sk-upstream", seed=1)
    fake.url = servers.serve(fake.app)  # type: ignore[attr-defined]
    yield fake
    servers.stop(fake.app)


def qwen(url: str) -> dict[str, Any]:
    """One model, two hosts: the same open model served at two quantizations."""
    dep = {"provider": "openai_compatible", "base_url": url + "/v1", "api_key": "sk-upstream"}
    return {"name": "qwen", "deployments": [{**dep, "id": "host-fp8", "model": "qwen-fp8"},
                                            {**dep, "id": "host-int4", "model": "qwen-int4"}],
            "routing": {"fallbacks": ["other"]}}


def other(url: str) -> dict[str, Any]:
    return {"name": "other", "deployments": [{"provider": "openai_compatible", "base_url": url + "/v1", "model": "o"}]}


def test_arms_name_one_deployment_and_bad_ids_are_refused() -> None:
    url = "http://127.0.0.1:1"
    cfg = parse_config({"models": [qwen(url), other(url)], "trials": [
        {"name": "hosts", "mode": "offline", "incumbent": "qwen@host-fp8", "candidates": ["qwen@host-int4"]}]}, "k.yaml")
    arm = cfg.model("qwen@host-int4")
    assert arm is not None and [d.id for d in arm.deployments] == ["host-int4"]
    assert arm.routing.fallbacks == []  # an arm's answers are that host's, never another model's
    assert cfg.model("qwen") is not None and len(cfg.model("qwen").deployments) == 2  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=r"trials\[0\]\.candidates\[0\]: model 'qwen' has no deployment 'host-x'; "
                                          r"its deployment ids: host-fp8, host-int4"):
        parse_config({"models": [qwen(url)], "trials": [
            {"name": "h", "incumbent": "qwen", "candidates": ["qwen@host-x"]}]}, "k.yaml")
    with pytest.raises(ConfigError, match="unknown model 'nope@host-fp8'"):
        parse_config({"models": [qwen(url)], "trials": [
            {"name": "h", "incumbent": "qwen", "candidates": ["nope@host-fp8"]}]}, "k.yaml")


def test_offline_trial_compares_two_hosts_of_one_model(make_gateway: Any, quiz: FakeQuiz, tmp_path: Path,
                                                       capsys: Any) -> None:
    trial = {"name": "hosts", "mode": "offline", "incumbent": "qwen@host-fp8", "candidates": ["qwen@host-int4"],
             "scorers": [{"type": "numeric"}], "margin": 0.05}
    gw = make_gateway({"models": [qwen(quiz.url), other(quiz.url)], "trials": [trial]})  # type: ignore[attr-defined]
    cfg = tmp_path / "k.yaml"
    cfg.write_text(yaml.safe_dump(gw.config.model_dump(mode="json", by_alias=True, exclude_none=True)))
    data = tmp_path / "quiz.jsonl"
    data.write_bytes(b"\n".join(orjson.dumps(r) for r in quiz_items(120, seed=4)) + b"\n")
    assert main(["trial", "run", "hosts", "--config", str(cfg), "--dataset", str(data), "--gateway", gw.url]) == 0
    assert "replayed 120 item(s): 120 pair(s)" in capsys.readouterr().out
    assert sorted({r["model"] for r in quiz.requests}) == ["qwen-fp8", "qwen-int4"]
    assert sum(1 for r in quiz.requests if r["model"] == "qwen-int4") == 120  # each arm on its own host only
    assert {r["model"] for r in gw.log_rows()} == {"qwen@host-fp8", "qwen@host-int4"}
    js = tmp_path / "r.json"
    assert main(["trial", "report", "hosts", "--config", str(cfg), "--json", str(js), "--resamples", "50"]) == 0
    c = orjson.loads(js.read_bytes())["by_candidate"][0]
    assert c["candidate"] == "qwen@host-int4"
    m = c["scorers"]["numeric"]["means"]
    assert m["incumbent"]["rate"] > 0.8 and m["candidate"]["rate"] < 0.75  # the int4 host answers worse
    assert c["verdict"]["verdict"] == "inferior"
