"""The ``kaiyuan`` command: serve, logs, models, and the admin commands other modules add."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kaiyuan import __version__
from kaiyuan.config import DEFAULT_HOST, DEFAULT_PORT, ConfigError, GatewayConfig, load_config

# Other modules add subcommands here: (name, help, add_arguments, run) -> exit code.
Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
EXTRA_COMMANDS: list[Command] = []


def _config(args: argparse.Namespace) -> GatewayConfig:
    path = getattr(args, "config", None) or os.environ.get("KAIYUAN_CONFIG")
    return load_config(path)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)  # migrations are routine; say only problems


def cmd_serve(args: argparse.Namespace) -> int:
    config = _config(args)
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    from kaiyuan.server import workers

    n = args.workers or config.server.workers or workers.default_workers()
    supervise = n > 1 or config.server.supervisor == "always"
    if supervise and workers.inherited_socket_fd() is None:  # the supervisor; its workers take the branch below
        cmd = [sys.executable, "-m", "kaiyuan", "--log-level", args.log_level, "serve", "--workers", "1",
               "--host", host, "--port", "0"]
        path = getattr(args, "config", None) or os.environ.get("KAIYUAN_CONFIG")
        if path:
            cmd += ["--config", str(Path(path).resolve())]
        return workers.serve(path, config, host, port, n, cmd)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - optional speed-up
        pass
    from kaiyuan.observability import multiproc
    from kaiyuan.observability.memtrace import install_from_env
    from kaiyuan.server.app import run_server

    install_from_env()  # KAIYUAN_TRACEMALLOC: heap snapshots on SIGUSR1, off unless set
    multiproc.install()  # a supervisor's worker: metric values in memory, synced to the shared files

    def ready(url: str) -> None:
        names = ", ".join(m.name for m in config.models) or "(none)"
        print(f"Kaiyuan {__version__} listening on {url}  (models: {names})", file=sys.stderr, flush=True)
        print(f"  try: curl {url}/v1/models", file=sys.stderr, flush=True)
        workers.say_ready()

    try:
        asyncio.run(run_server(config, host, port, ready, sock=workers.inherited_socket()))
    except OSError as e:
        print(f"error: cannot listen on {host}:{port}: {e.strerror or e} (pick another --port?)", file=sys.stderr)
        return 1
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from sqlalchemy import inspect, select

    from kaiyuan.store.db import make_engine, sqlite_path
    from kaiyuan.store.schema import request_log as t

    config = _config(args)
    url = args.db or config.store.url
    path = sqlite_path(url)
    if path is not None and not Path(path).exists():
        print(f"no request log at {Path(path).resolve()} (store.url {url}); run this where the gateway started, "
              "or pass --config / --db", file=sys.stderr)
        return 1
    engine = make_engine(url)  # reading never migrates or creates anything
    where = str(Path(path).resolve()) if path else engine.url.render_as_string(hide_password=True)
    print(f"request log: {where}", file=sys.stderr)
    with engine.connect() as conn:
        if not inspect(conn).has_table("request_log"):
            print("no request_log table in that database (has the gateway run with it?)", file=sys.stderr)
            return 1
        q = select(t).order_by(t.c.ts.desc()).limit(args.limit)
        if args.model:
            q = q.where(t.c.model == args.model)
        if args.errors:
            q = q.where(t.c.status >= 400)
        rows = list(conn.execute(q).mappings())
    engine.dispose()
    if not rows:
        print("no requests logged yet")
        return 0
    header = f"{'time':19}  {'status':>6}  {'model':24}  {'deployment':32}  {'in':>6}  {'out':>6}  {'cached':>6}  {'ms':>8}  {'ttft':>7}  error"
    print(header)
    for r in reversed(rows):
        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["ts"]))
        status = "cancel" if r["cancelled"] else str(r["status"])
        err = (r["error"] or "")[:80]
        print(
            f"{ts:19}  {status:>6}  {(r['model'] or '-')[:24]:24}  {(r['deployment'] or '-')[:32]:32}  "
            f"{_n(r['prompt_tokens']):>6}  {_n(r['completion_tokens']):>6}  {_n(r['cached_tokens']):>6}  "
            f"{_n(r['latency_ms'], 1):>8}  {_n(r['ttft_ms'], 1):>7}  {err}"
        )
    return 0


def _n(v: object, digits: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def cmd_models(args: argparse.Namespace) -> int:
    config = _config(args)
    for m in config.models:
        print(m.name)
        for d in m.deployments:
            where = getattr(d, "public_url", None) or getattr(d, "path", None) or "(embedded)"
            print(f"  - {d.id}  provider={d.provider}  model={d.model}  {where}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    path = getattr(args, "config", None) or os.environ.get("KAIYUAN_CONFIG")
    config = load_config(path)
    what = path or "the zero-config default (no --config, no KAIYUAN_CONFIG)"
    if not config.models:
        print(f"error: {what}: no models configured; add at least one under 'models:' (see README)", file=sys.stderr)
        return 2
    print(f"configuration OK: {what}: {len(config.models)} model(s)")
    return 0


def _worker_count(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        n = 0
    if not 1 <= n <= 512:
        raise argparse.ArgumentTypeError(f"--workers must be a whole number from 1 to 512, not {v!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kaiyuan", description="Kaiyuan: an LLM gateway for open-weight models.")
    p.add_argument("--version", action="version", version=f"kaiyuan {__version__}")
    p.add_argument("--log-level", default=os.environ.get("KAIYUAN_LOG_LEVEL", "info"))
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="start the gateway")
    s.add_argument("--config", "-c", help="YAML config file (default: zero-config local model)")
    s.add_argument("--host", help=f"address to listen on (default {DEFAULT_HOST})")
    s.add_argument("--port", type=int, help=f"port (default {DEFAULT_PORT})")
    s.add_argument("--workers", "-w", type=_worker_count, help="worker processes (default: server.workers, else the number of cores)")
    s.set_defaults(func=cmd_serve)

    lg = sub.add_parser("logs", help="show recent requests from the request log")
    lg.add_argument("--config", "-c")
    lg.add_argument("--db", help="database URL (default: the config's store.url)")
    lg.add_argument("-n", "--limit", type=int, default=20)
    lg.add_argument("--model")
    lg.add_argument("--errors", action="store_true", help="only failed requests")
    lg.set_defaults(func=cmd_logs)

    m = sub.add_parser("models", help="list configured models and deployments")
    m.add_argument("--config", "-c")
    m.set_defaults(func=cmd_models)

    c = sub.add_parser("check", help="validate a config file and exit")
    c.add_argument("--config", "-c", help="YAML config file (default: $KAIYUAN_CONFIG, else the zero-config default)")
    c.set_defaults(func=cmd_check)

    _load_plugins()
    for name, help_, add_args, run in EXTRA_COMMANDS:
        e = sub.add_parser(name, help=help_)
        add_args(e)
        e.set_defaults(func=run)
    return p


def _load_plugins() -> None:
    """Import the modules that register extra subcommands (kept lazy: serve stays fast to start)."""
    import importlib

    for mod in ("kaiyuan.admin_cli", "kaiyuan.trials.cli", "kaiyuan.console.cli"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
