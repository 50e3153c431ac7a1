"""A bad config fails at start with a message naming the file, the key and what is wrong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kaiyuan.config import ConfigError, load_config, parse_config

DEEPSEEK_QWEN = """
models:
  - name: deepseek-chat
    deployments:
      - provider: openai_compatible
        base_url: https://api.deepseek.com/v1
        model: deepseek-chat
        api_key: ${DEEPSEEK_API_KEY}
  - name: qwen-plus
    deployments:
      - provider: openai_compatible
        base_url: https://dashscope.aliyuncs.com/compatible-mode/v1
        model: qwen-plus
        api_key: ${DASHSCOPE_API_KEY}
        timeouts: {first_byte: 30, idle: 30}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "kaiyuan.yaml"
    p.write_text(text)
    return p


def test_documented_shape_loads_with_env_secrets(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, DEEPSEEK_QWEN), env={"DEEPSEEK_API_KEY": "sk-ds", "DASHSCOPE_API_KEY": "sk-qw"})
    ds = cfg.models[0].deployments[0]
    assert ds.api_key == "sk-ds" and ds.id == "openai_compatible:deepseek-chat@api.deepseek.com"  # type: ignore[union-attr]
    assert cfg.models[1].deployments[0].timeouts.first_byte == 30


@pytest.mark.parametrize(
    ("text", "env", "fragments"),
    [
        (DEEPSEEK_QWEN, {}, ["models[0].deployments[0].api_key", "DEEPSEEK_API_KEY is not set"]),
        ("models: [\n  - name: x\n", {}, ["not valid YAML", "line"]),
        ("- just a list", {}, ["top level must be a mapping"]),
        ("models:\n  - name: x\n    deployments: []\n", {}, ["models[0].deployments", "at least 1"]),
        ("models:\n  - name: x\n    deployments:\n      - provider: openai_compatible\n        model: m\n", {}, ["models[0].deployments[0].base_url", "Field required"]),
        ("models:\n  - name: x\n    deployments:\n      - provider: openai_compatible\n        model: m\n        base_url: api.deepseek.com\n", {}, ["base_url", "http(s) URL"]),
        ("models:\n  - name: x\n    deployments:\n      - provider: telepathy\n        model: m\n", {}, ["models[0].deployments[0]", "telepathy"]),
        ("models:\n  - name: x\n    deployments:\n      - model: m\n", {}, ["missing 'provider'"]),
        ("models:\n  - name: x\n    deplyments: []\n", {}, ["models[0].deplyments", "unknown key"]),
        ("server:\n  port: 99999\n", {}, ["server.port", "less than or equal"]),
        ("models:\n  - name: a\n    deployments: [{provider: local}]\n  - name: a\n    deployments: [{provider: local}]\n", {}, ["unique", "a"]),
        ("models:\n  - name: x\n    deployments:\n      - {provider: local, timeouts: {idle: -1}}\n", {}, ["timeouts.idle", "greater than 0"]),
        ("models:\n  - name: a\n    deployments: [{provider: local, id: main}]\n  - name: b\n    deployments: [{provider: local}, {provider: local, id: main}]\n",
         {}, ["deployment id 'main' is used twice", "models[0].deployments[0] (model 'a')", "models[1].deployments[1] (model 'b')"]),
    ],
)
def test_bad_configs_name_file_and_key(tmp_path: Path, text: str, env: dict[str, str], fragments: list[str]) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p, env=env)
    msg = str(e.value)
    assert str(p) in msg
    for f in fragments:
        assert f in msg, msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_env_default_syntax() -> None:
    cfg = parse_config({"models": [{"name": "x", "deployments": [{"provider": "openai_compatible", "model": "m",
                                                                  "base_url": "${BASE:-http://localhost:8000/v1}"}]}]}, env={})
    assert cfg.models[0].deployments[0].base_url == "http://localhost:8000/v1"  # type: ignore[union-attr]


def test_cli_fails_at_start_with_the_message(tmp_path: Path) -> None:
    p = write(tmp_path, "models:\n  - name: x\n    deployments:\n      - provider: openai_compatible\n        model: m\n")
    r = subprocess.run([sys.executable, "-m", "kaiyuan", "serve", "--config", str(p)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "models[0].deployments[0].base_url: Field required" in r.stderr
    assert "Traceback" not in r.stderr


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = write(tmp_path, f"store: {{url: 'sqlite:///{tmp_path}/k.db'}}\nmodels:\n  - name: m\n    deployments:\n"
                            "      - {provider: openai_compatible, model: m, base_url: 'http://127.0.0.1:9/v1'}\n")
        r = subprocess.run([sys.executable, "-m", "kaiyuan", "serve", "--config", str(p), "--port", str(port)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
    assert "Unclosed" not in r.stderr


def test_generated_deployment_ids_are_unique_across_models() -> None:
    """Two models on one upstream model and host: their generated ids get ``#MODEL``; a lone id stays
    as it was; a trial arm may still name the deployment by its generated id."""
    dep = {"provider": "openai_compatible", "base_url": "http://h:1/v1", "model": "up"}
    cfg = parse_config({
        "models": [{"name": "a", "deployments": [dep]}, {"name": "b", "deployments": [dep]},
                   {"name": "c", "deployments": [{**dep, "model": "other"}]}],
        "trials": [{"name": "t", "incumbent": "b", "candidates": ["a@openai_compatible:up@h:1"], "scorers": [{"type": "exact"}]}],
    })
    ids = {m.name: [d.id for d in m.deployments] for m in cfg.models}
    assert ids["a"] == ["openai_compatible:up@h:1#a"] and ids["b"] == ["openai_compatible:up@h:1#b"]
    assert ids["c"] == ["openai_compatible:other@h:1"]
    assert ids["a@openai_compatible:up@h:1"] == ["openai_compatible:up@h:1#a"]
