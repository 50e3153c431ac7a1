#!/usr/bin/env bash
# The full test suite: lint, types, then pytest with real Redis/PostgreSQL when installed.
# Usage: scripts/test.sh [pytest args...]   (run by `make test` and by .ci/run)
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${VENV:-.venv}/bin"

"$BIN/ruff" check kaiyuan tests bench || exit 1
"$BIN/mypy" || exit 1

eval "$(scripts/test-services.sh)"
cleanup() {
  [ -n "${KAIYUAN_TEST_REDIS_PIDFILE:-}" ] && [ -f "$KAIYUAN_TEST_REDIS_PIDFILE" ] && kill "$(cat "$KAIYUAN_TEST_REDIS_PIDFILE")" 2>/dev/null
  if [ -n "${KAIYUAN_TEST_POSTGRES_DATA:-}" ]; then
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$KAIYUAN_TEST_POSTGRES_BIN/pg_ctl" -D "$KAIYUAN_TEST_POSTGRES_DATA" -m immediate stop >/dev/null 2>&1
    else "$KAIYUAN_TEST_POSTGRES_BIN/pg_ctl" -D "$KAIYUAN_TEST_POSTGRES_DATA" -m immediate stop >/dev/null 2>&1; fi
  fi
  # the throw-away state (PostgreSQL data dir, Redis log) goes too; only a dir test-services.sh made
  case "${KAIYUAN_TEST_STATE_OWNED:-}" in
    */kaiyuan-test-services.*) rm -rf -- "$KAIYUAN_TEST_STATE_OWNED" ;;
  esac
}
trap cleanup EXIT
echo "redis: ${KAIYUAN_TEST_REDIS_URL:-not installed (those tests will skip)}"
echo "postgres: ${KAIYUAN_TEST_POSTGRES_URL:-not installed (those tests will skip)}"

"$BIN/python" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
