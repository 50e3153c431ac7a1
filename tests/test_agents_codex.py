"""Codex CLI (npm @openai/codex, as shipped) through Kaiyuan: ``codex exec`` non-interactively, a
custom model provider (wire_api = "responses") pointed at a real gateway, analytics off, and a
scripted OpenAI-compatible upstream: one shell-tool call (exec_command), then a final answer.

The CLI is installed by scripts/install-agents.sh into .agents/; without it (no npm, offline) the
test skips with the reason (install steps: docs/agents.md)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kaiyuan.testing.fake_openai import Behaviour
from kaiyuan.testing.harness import RunningGateway
from tests.conftest import openai_model

ROOT = Path(__file__).resolve().parents[1]
CODEX = Path(os.environ.get("KAIYUAN_AGENTS_DIR", ROOT / ".agents")) / "node_modules" / ".bin" / "codex"
MARKER = "kaiyuan-codex-ok"


def _config(gw: RunningGateway) -> str:
    return f'''model = "codex-model"
model_provider = "kaiyuan"
check_for_update_on_startup = false

[model_providers.kaiyuan]
name = "Kaiyuan"
base_url = "{gw.base_url}"
wire_api = "responses"
env_key = "KAIYUAN_TEST_KEY"
request_max_retries = 0
stream_max_retries = 0

[analytics]
enabled = false
'''


NOT_INSTALLED = (f"Codex CLI not installed at {CODEX}: run scripts/install-agents.sh (needs npm and the npm "
                 "registry); see docs/agents.md")
PROMPT = f"Run `echo {MARKER}` in the shell, then tell me what it printed."
NATIVE = {  # an upstream of each native protocol, for model "codex-model"
    "anthropic": lambda fake: {"provider": "anthropic", "base_url": fake.url, "model": "claude-up",
                               "api_key": "sk-ant-upstream"},
    "gemini": lambda fake: {"provider": "gemini", "base_url": fake.url + "/v1beta", "model": "gemini-up",
                            "api_key": "gm-upstream"},
}


def _codex_exec(gw: RunningGateway, tmp_path: Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """``codex exec`` once, in a fresh CODEX_HOME pointed at ``gw``; asserts it exited 0 (``ok``)."""
    home = tmp_path / "home"
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True)
    (codex_home / "config.toml").write_text(_config(gw))
    work = tmp_path / "work"
    work.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "CODEX_HOME": str(codex_home),
           "KAIYUAN_TEST_KEY": "unused", "NO_COLOR": "1", "TERM": "dumb", "LANG": "C.UTF-8"}
    proc = subprocess.run([str(CODEX), "exec", "--skip-git-repo-check", "--sandbox", "danger-full-access", PROMPT],
                          cwd=work, env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert (proc.returncode == 0) is ok, (proc.stdout + proc.stderr)[-4000:]
    return proc


@pytest.mark.skipif(not CODEX.exists(), reason=NOT_INSTALLED)
def test_codex_exec_completes_a_shell_tool_episode(make_gateway: Callable[[dict[str, Any]], RunningGateway],
                                                   fake_openai: Any, tmp_path: Path) -> None:
    gw = make_gateway({"models": [openai_model("codex-model", fake_openai.url, "upstream-chat")]})
    fake_openai.next(Behaviour(tool_calls=[("exec_command", json.dumps({"cmd": f"echo {MARKER}"}))]))
    proc = _codex_exec(gw, tmp_path)
    out = proc.stdout + proc.stderr
    # The episode: the first call offered exec_command (and web_search, left out), the second carried its output.
    first, second = fake_openai.requests[0], fake_openai.requests[-1]
    assert any(t["function"]["name"] == "exec_command" for t in first["tools"])
    results = [m for m in second["messages"] if m["role"] == "tool"]
    assert results and MARKER in str(results[-1]["content"]), second["messages"][-3:]
    assert "tool said:" in proc.stdout and MARKER in proc.stdout, out[-4000:]


@pytest.mark.skipif(not CODEX.exists(), reason=NOT_INSTALLED)
@pytest.mark.parametrize("native", sorted(NATIVE))
def test_codex_exec_onto_a_native_upstream(make_gateway: Callable[[dict[str, Any]], RunningGateway],
                                           fake_anthropic: Any, fake_gemini: Any, tmp_path: Path, native: str) -> None:
    """Responses -> Anthropic Messages (and -> Gemini) end to end with the real CLI: its tools,
    reasoning settings, developer messages and stateless turns (store: false) translated both ways."""
    fake = fake_anthropic if native == "anthropic" else fake_gemini
    gw = make_gateway({"models": [{"name": "codex-model", "deployments": [NATIVE[native](fake)]}]})
    fake.default = Behaviour(agent_tools={"exec_command": {"cmd": f"echo {MARKER}"}})
    proc = _codex_exec(gw, tmp_path)
    first, last = fake.requests[0], fake.requests[-1]
    if native == "anthropic":
        assert any(t.get("name") == "exec_command" for t in first["tools"])
        results = [blk for m in last["messages"] if isinstance(m["content"], list) for blk in m["content"]
                   if blk.get("type") == "tool_result"]
    else:
        assert any(d["name"] == "exec_command" for t in first["tools"] for d in t.get("functionDeclarations") or [])
        results = [p["functionResponse"] for c in last["contents"] for p in c["parts"] if "functionResponse" in p]
    assert results and MARKER in str(results[-1]), str(results)[-2000:]
    # the final answer (the fake's "done: <tool output>") reached the CLI
    assert "done:" in proc.stdout and MARKER in proc.stdout.split("done:", 1)[1], (proc.stdout + proc.stderr)[-4000:]


@pytest.mark.skipif(not CODEX.exists(), reason=NOT_INSTALLED)
def test_codex_sees_a_native_upstream_refusal(make_gateway: Callable[[dict[str, Any]], RunningGateway],
                                             fake_anthropic: Any, tmp_path: Path) -> None:
    """An Anthropic upstream's 400 reaches Codex in the Responses error shape, its message intact:
    the CLI stops with it (no hang, no retry loop)."""
    gw = make_gateway({"models": [{"name": "codex-model", "deployments": [NATIVE["anthropic"](fake_anthropic)]}]})
    fake_anthropic.default = Behaviour(status=400, error_message="prompt is too long: 250000 tokens > 200000 maximum")
    proc = _codex_exec(gw, tmp_path, ok=False)
    assert "prompt is too long" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-4000:]
