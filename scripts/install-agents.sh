#!/usr/bin/env bash
# Install the coding-agent CLIs the agent integration tests drive (tests/test_agents_*.py) into a
# repo-local, gitignored folder: .agents/node_modules/.bin/<cli>. Pinned versions; idempotent (a
# CLI already at its pinned version is not reinstalled). Needs npm and the npm registry; when either
# is missing it says so and exits 0, and the tests that need a CLI skip with the reason.
# Usage: scripts/install-agents.sh        (called by .ci/run; see docs/agents.md)
set -uo pipefail
cd "$(dirname "$0")/.."
PREFIX="${KAIYUAN_AGENTS_DIR:-.agents}"

# name@version, one per CLI. Helpers add their CLIs here.
PACKAGES=(
  "@openai/codex@0.171.0"
  "@anthropic-ai/claude-code@2.1.332"
  "@google/gemini-cli@0.61.0"
  "@qwen-code/qwen-code@0.24.4"
  "opencode-ai@1.18.33"
)

if ! command -v npm >/dev/null 2>&1; then
  echo "install-agents: npm not found; the agent CLI tests will skip (install Node.js >= 20 and npm)" >&2
  exit 0
fi
mkdir -p "$PREFIX"
[ -f "$PREFIX/package.json" ] || echo '{"name": "kaiyuan-agents", "private": true}' > "$PREFIX/package.json"

installed_version() {  # the version of $1 under $PREFIX, or nothing
  local pj="$PREFIX/node_modules/$1/package.json"
  [ -f "$pj" ] && node -e "process.stdout.write(require(process.argv[1]).version)" "$(cd "$(dirname "$pj")" && pwd)/package.json" 2>/dev/null
}

need=()
for spec in "${PACKAGES[@]}"; do
  name="${spec%@*}"
  version="${spec##*@}"
  if [ "$(installed_version "$name")" != "$version" ]; then
    need+=("$spec")
  fi
done
if [ "${#need[@]}" -eq 0 ]; then
  echo "install-agents: all pinned CLIs present in $PREFIX"
  exit 0
fi
echo "install-agents: installing ${need[*]} into $PREFIX"
if ! npm install --prefix "$PREFIX" --no-audit --no-fund --loglevel=error "${need[@]}"; then
  echo "install-agents: npm install failed (offline?); the agent CLI tests will skip. See docs/agents.md" >&2
fi
exit 0
