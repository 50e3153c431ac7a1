#!/usr/bin/env bash
# Start throw-away Redis and PostgreSQL servers on 127.0.0.1 for the test suite, if their binaries
# are installed and the caller has not already pointed the tests at servers of their own.
# Prints `export ...` lines to eval; stops nothing (scripts/test.sh stops them on exit and deletes
# the state directory it created, KAIYUAN_TEST_STATE_OWNED).
set -euo pipefail
if [ -n "${KAIYUAN_TEST_STATE:-}" ]; then
  state="$KAIYUAN_TEST_STATE"
else
  state="$(mktemp -d "${TMPDIR:-/tmp}/kaiyuan-test-services.XXXXXX")"
  # ours to delete: scripts/test.sh removes it (the PostgreSQL data dir is ~60 MB) once the servers stop
  echo "export KAIYUAN_TEST_STATE_OWNED=$state"
fi
mkdir -p "$state"
chmod 777 "$state"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

if [ -z "${KAIYUAN_TEST_REDIS_URL:-}" ] && command -v redis-server >/dev/null 2>&1; then
  port=$(free_port)
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --pidfile "$state/redis.pid" --logfile "$state/redis.log" --dir "$state" >/dev/null
  for _ in $(seq 1 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  echo "export KAIYUAN_TEST_REDIS_URL=redis://127.0.0.1:$port/0"
  echo "export KAIYUAN_TEST_REDIS_PIDFILE=$state/redis.pid"
fi

pgbin=""
for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && pgbin="$d"; done
if [ -z "${KAIYUAN_TEST_POSTGRES_URL:-}" ] && [ -n "$pgbin" ]; then
  port=$(free_port)
  as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
  as_pg "$pgbin/initdb" -D "$state/pg" -U postgres -A trust >/dev/null
  as_pg "$pgbin/pg_ctl" -D "$state/pg" -l "$state/pg.log" -w \
    -o "-p $port -k $state -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >/dev/null
  as_pg "$pgbin/createdb" -h 127.0.0.1 -p "$port" -U postgres kaiyuan_test
  echo "export KAIYUAN_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:$port/kaiyuan_test"
  echo "export KAIYUAN_TEST_POSTGRES_DATA=$state/pg"
  echo "export KAIYUAN_TEST_POSTGRES_BIN=$pgbin"
fi
