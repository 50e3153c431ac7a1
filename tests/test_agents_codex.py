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


@pytest.mark.skipif(not CODEX.exists(), reason=f"Codex CLI not installed at {CODEX}: run scripts/install-agents.sh "
                    "(needs npm and the npm registry); see docs/agents.md")
def test_codex_exec_completes_a_shell_tool_episode(make_gateway: Callable[[dict[str, Any]], RunningGateway],
                                                   fake_openai: Any, tmp_path: Path) -> None:
    gw = make_gateway({"models": [openai_model("codex-model", fake_openai.url, "upstream-chat")]})
    fake_openai.next(Behaviour(tool_calls=[("exec_command", json.dumps({"cmd": f"echo {MARKER}"}))]))
    home = tmp_path / "home"
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True)
    (codex_home / "config.toml").write_text(_config(gw))
    work = tmp_path / "work"
    work.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "CODEX_HOME": str(codex_home),
           "KAIYUAN_TEST_KEY": "unused", "NO_COLOR": "1", "TERM": "dumb", "LANG": "C.UTF-8"}
    proc = subprocess.run([str(CODEX), "exec", "--skip-git-repo-check", "--sandbox", "danger-full-access",
                           f"Run `echo {MARKER}` in the shell, then tell me what it printed."],
                          cwd=work, env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # The episode: the first call offered exec_command (and web_search, left out), the second carried its output.
    first, second = fake_openai.requests[0], fake_openai.requests[-1]
    assert any(t["function"]["name"] == "exec_command" for t in first["tools"])
    results = [m for m in second["messages"] if m["role"] == "tool"]
    assert results and MARKER in str(results[-1]["content"]), second["messages"][-3:]
    assert "tool said:" in proc.stdout and MARKER in proc.stdout, out[-4000:]
