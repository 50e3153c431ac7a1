#!/usr/bin/env bash
# Install Portkey's open-source gateway into bench/.portkey for the benchmark's Portkey column.
# @portkey-ai/gateway 1.15.2 as npm delivers it fails every streaming request (`TypeError: immutable`,
# from @hono/node-server >= 1.14), so that dependency is pinned to 1.13.8 with an npm override.
set -euo pipefail
dir="$(cd "$(dirname "$0")" && pwd)/.portkey"
mkdir -p "$dir"
cat > "$dir/package.json" <<'JSON'
{"name": "kaiyuan-bench-portkey", "private": true,
 "dependencies": {"@portkey-ai/gateway": "1.15.2"},
 "overrides": {"@hono/node-server": "1.13.8"}}
JSON
cd "$dir" && npm install --no-audit --no-fund --silent
echo "installed: $(node -p "require('./node_modules/@portkey-ai/gateway/package.json').version") in $dir"
