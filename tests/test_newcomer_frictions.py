"""What a newcomer hits first, following the README: config errors, check, logs, the local model.

Each test is one friction from issue 12, so that it stays fixed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kaiyuan.accounting.prices import PriceCatalog, deployment_price
from kaiyuan.cli import main
from kaiyuan.config import AccountingSettings, ConfigError, LocalDeployment, default_config, parse_config

_DEP = {"provider": "openai_compatible", "base_url": "http://h/v1", "model": "m"}


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(data, "k.yaml", {})
    return str(e.value)


def test_typo_in_a_key_gets_did_you_mean() -> None:
    msg = _error({"server": {"prot": 4000}})
    assert "server.prot: unknown key; did you mean 'port'?" in msg
    msg = _error({"models": [{"name": "a", "deployments": [{**_DEP, "timout": {}}]}]})
    assert "models[0].deployments[0].timout: unknown key; did you mean 'timeouts'?" in msg
    assert "did you mean 'models'?" in _error({"modles": []})


def test_typo_in_a_provider_gets_did_you_mean_not_pydantic_text() -> None:
    msg = _error({"models": [{"name": "a", "deployments": [{**_DEP, "provider": "openai-compatible"}]}]})
    assert "unknown provider 'openai-compatible'; did you mean 'openai_compatible'?" in msg
    assert "Input tag" not in msg and "expected tags" not in msg


def test_unknown_key_without_a_close_match_lists_the_allowed_keys() -> None:
    msg = _error({"store": {"zzzz": 1}})
    assert "allowed here: url" in msg


def test_literal_typo_gets_did_you_mean() -> None:
    msg = _error({"limits": {"backend": "rediss"}})
    assert "'rediss' is not allowed; did you mean 'redis'?" in msg


def test_local_deployment_with_its_own_path_is_named_after_the_file() -> None:
    d = LocalDeployment(provider="local", path="/models/qwen2.5-0.5b-instruct-q4_k_m.gguf")
    assert d.model == "qwen2.5-0.5b-instruct-q4_k_m"
    assert d.default_id() == "local:qwen2.5-0.5b-instruct-q4_k_m"
    named = LocalDeployment(provider="local", path="/m/x.gguf", model="my-name")
    assert named.model == "my-name"
    assert LocalDeployment(provider="local").model == "smollm2-135m-instruct"


def test_embedded_model_is_priced_at_zero_and_self_hosted() -> None:
    dep = default_config().models[0].deployments[0]
    price = deployment_price(dep, PriceCatalog.load(AccountingSettings()))
    assert price is not None and price.vendor == "self-hosted"
    assert price.base.input == 0 and price.base.output == 0


def test_check_without_config_checks_the_default(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("KAIYUAN_CONFIG", raising=False)
    assert main(["check"]) == 0
    assert "zero-config default" in capsys.readouterr().out


def test_check_fails_a_config_with_no_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "k.yaml"
    cfg.write_text("server: {port: 4001}\n")
    assert main(["check", "--config", str(cfg)]) == 2
    assert "no models configured" in capsys.readouterr().err


def test_logs_outside_the_start_dir_names_the_db_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KAIYUAN_CONFIG", raising=False)
    assert main(["logs"]) == 1
    err = capsys.readouterr().err
    assert f"no request log at {tmp_path / 'kaiyuan.db'}" in err
    assert os.listdir(tmp_path) == []


def test_logs_says_which_database_it_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kaiyuan.store.db import open_store

    db = tmp_path / "g.db"
    open_store(f"sqlite:///{db}").dispose()
    assert main(["logs", "--db", f"sqlite:///{db}"]) == 0
    out = capsys.readouterr()
    assert f"request log: {db}" in out.err
    assert "no requests logged yet" in out.out
