"""Coding-agent CLIs from npm, as shipped, through Kaiyuan: each completes a tool episode (one shell
call, then a final answer) against a scripted fake upstream (issue 10).

The CLIs are installed by ``scripts/install-agents.sh`` (pinned versions) into ``.agents/``; a CLI
that is not there skips its test with the reason. Each runs non-interactively with telemetry off in
a throw-away HOME. The fake upstream calls the CLI's own shell tool with ``echo kaiyuan-ok`` and,
once it has the tool's result, answers ``done: <result>``: the word reaches the final answer only
if the CLI really ran the command and sent its output back through the gateway.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI
from kaiyuan.testing.harness import RunningGateway

AGENTS_DIR = Path(os.environ.get("KAIYUAN_AGENTS_DIR", Path(__file__).resolve().parent.parent / ".agents"))
WORD = "kaiyuan-ok"
SHELL = {"command": f"echo {WORD}", "description": "print the word"}
# each CLI's shell tool: Claude Code "Bash", Gemini CLI and Qwen Code "run_shell_command", opencode "bash"
EPISODE = Behaviour(agent_tools={"Bash": SHELL, "run_shell_command": {"command": SHELL["command"]}, "bash": SHELL})
CLAUDE_DEFAULT_MODEL = "claude-opus-5-5"  # @anthropic-ai/claude-code 2.1.332's default; no --model is passed
GEMINI_MODELS = ("gemini-3.1-pro-preview", "gemini-3.5-flash", "gemini-3.5-flash-lite")  # Gemini CLI 0.61.0's main and side models
TIMEOUT = 150
QUIET = {"DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1", "DISABLE_AUTOUPDATER": "1",
         "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "GEMINI_TELEMETRY_ENABLED": "false",
         "OPENCODE_DISABLE_AUTOUPDATE": "1", "OPENCODE_DISABLE_MODELS_FETCH": "1", "NO_COLOR": "1", "CI": "1"}
GEMINI_SETTINGS = {"security": {"auth": {"selectedType": "gemini-api-key"}}, "telemetry": {"enabled": False},
                   "privacy": {"usageStatisticsEnabled": False}}


def cli(name: str) -> str:
    path = AGENTS_DIR / "node_modules" / ".bin" / name
    if not path.exists():
        pytest.skip(f"{name} is not installed in {AGENTS_DIR}: run scripts/install-agents.sh (needs npm and the npm "
                    "registry; see README, Agents)")
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    return str(path)


def run(cmd: list[str], home: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "LANG": "C.UTF-8", **QUIET, **env}
    work = home / "work"
    work.mkdir(exist_ok=True)
    return subprocess.run(cmd, env=full, cwd=work, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def upstream_model(name: str, fake: Any, protocol: str = "openai") -> dict[str, Any]:
    if protocol == "anthropic":
        dep = {"provider": "anthropic", "base_url": fake.url, "model": "claude-up", "api_key": "sk-ant-upstream"}
    elif protocol == "gemini":
        dep = {"provider": "gemini", "base_url": fake.url + "/v1beta", "model": "gemini-up", "api_key": "gm-upstream"}
    else:
        dep = {"provider": "openai_compatible", "base_url": fake.url + "/v1", "model": "up-model", "api_key": "sk-upstream"}
    return {"name": name, "deployments": [dep]}


def assert_episode(p: subprocess.CompletedProcess[str], gw: RunningGateway, fake: Any) -> None:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout: {p.stdout[-2000:]}\nstderr: {p.stderr[-3000:]}"
    assert "done: " in p.stdout and WORD in p.stdout.split("done: ", 1)[1], p.stdout[-2000:]
    assert any(WORD in json.dumps(r) for r in fake.requests), "the tool's output never reached the upstream"
    rows = [r for r in gw.log_rows() if r["endpoint"] != "count_tokens"]
    assert rows and all(r["status"] == 200 for r in rows), [(r["status"], r["error"]) for r in rows]


@pytest.fixture
def fake_agent_openai(fake_openai: FakeOpenAI) -> FakeOpenAI:
    fake_openai.default = EPISODE
    return fake_openai


@pytest.mark.parametrize("upstream", ["anthropic", "openai", "gemini"])
def test_claude_code(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_agent_openai: FakeOpenAI,
                     fake_anthropic: Any, fake_gemini: Any, tmp_path: Path, upstream: str) -> None:
    claude = cli("claude")
    fake_anthropic.default = fake_gemini.default = EPISODE
    fake = {"anthropic": fake_anthropic, "openai": fake_agent_openai, "gemini": fake_gemini}[upstream]
    gw = make_gateway({"models": [upstream_model(CLAUDE_DEFAULT_MODEL, fake, upstream)]})
    p = run([claude, "-p", "Print the word using the shell.", "--allowedTools", "Bash", "--max-turns", "4"], tmp_path,
            {"ANTHROPIC_BASE_URL": gw.url, "ANTHROPIC_API_KEY": "sk-any"})
    assert_episode(p, gw, fake)
    sent = fake.requests[-1]
    if upstream == "anthropic":  # Claude Code's own fields passed through
        assert sent["model"] == "claude-up" and sent["max_tokens"] > 0
    elif upstream == "gemini":
        assert any(d["name"] == "Bash" for t in sent["tools"] for d in t["functionDeclarations"])
    else:
        assert any(t["function"]["name"] == "Bash" for t in sent["tools"])


def test_claude_code_wrong_key_fails_fast(make_gateway: Callable[[dict[str, Any]], RunningGateway],
                                          fake_agent_openai: FakeOpenAI, tmp_path: Path) -> None:
    claude = cli("claude")
    gw = make_gateway({"server": {"master_key": "sk-master-cli"},
                       "models": [upstream_model(CLAUDE_DEFAULT_MODEL, fake_agent_openai)]})
    p = run([claude, "-p", "hi"], tmp_path, {"ANTHROPIC_BASE_URL": gw.url, "ANTHROPIC_API_KEY": "sk-wrong"})
    assert p.returncode != 0
    assert "invalid API key" in p.stdout + p.stderr
    rows = gw.log_rows()
    assert rows and all(r["status"] == 401 for r in rows) and len(rows) <= 3, len(rows)  # no retry storm
    assert not fake_agent_openai.requests


@pytest.mark.parametrize("upstream", ["openai", "gemini"])
def test_gemini_cli(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_agent_openai: FakeOpenAI,
                    fake_gemini: Any, tmp_path: Path, upstream: str) -> None:
    gemini = cli("gemini")
    fake_gemini.default = EPISODE
    fake = fake_gemini if upstream == "gemini" else fake_agent_openai
    gw = make_gateway({"models": [upstream_model(m, fake, upstream) for m in GEMINI_MODELS]})
    (tmp_path / ".gemini").mkdir()
    (tmp_path / ".gemini" / "settings.json").write_text(json.dumps(GEMINI_SETTINGS))
    p = run([gemini, "-p", "Print the word using the shell.", "--yolo"], tmp_path,
            {"GOOGLE_GEMINI_BASE_URL": gw.url, "GEMINI_API_KEY": "any", "GEMINI_CLI_TRUST_WORKSPACE": "true"})
    assert_episode(p, gw, fake)
    assert {r["dialect"] for r in gw.log_rows()} == {"gemini"}


def test_qwen_code(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_agent_openai: FakeOpenAI,
                   tmp_path: Path) -> None:
    qwen = cli("qwen")
    gw = make_gateway({"models": [upstream_model("qwen3-coder", fake_agent_openai)]})
    (tmp_path / ".qwen").mkdir()
    (tmp_path / ".qwen" / "settings.json").write_text(json.dumps({**GEMINI_SETTINGS, "security": {"auth": {"selectedType": "openai"}}}))
    p = run([qwen, "-p", "Print the word using the shell.", "--yolo"], tmp_path,
            {"OPENAI_BASE_URL": gw.base_url, "OPENAI_API_KEY": "any", "OPENAI_MODEL": "qwen3-coder"})
    assert_episode(p, gw, fake_agent_openai)


def test_opencode(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_agent_openai: FakeOpenAI,
                  tmp_path: Path) -> None:
    opencode = cli("opencode")
    gw = make_gateway({"models": [upstream_model("kaiyuan-coder", fake_agent_openai)]})
    config = {"$schema": "https://opencode.ai/config.json", "model": "kaiyuan/kaiyuan-coder", "autoupdate": False,
              "share": "disabled", "permission": {"bash": "allow"},
              "provider": {"kaiyuan": {"npm": "@ai-sdk/openai-compatible", "name": "Kaiyuan",
                                       "options": {"baseURL": gw.base_url, "apiKey": "any"},
                                       "models": {"kaiyuan-coder": {"name": "kaiyuan-coder"}}}}}
    (tmp_path / "opencode.json").write_text(json.dumps(config))
    p = run([opencode, "run", "Print the word using the shell."], tmp_path, {"OPENCODE_CONFIG": str(tmp_path / "opencode.json")})
    assert_episode(p, gw, fake_agent_openai)
