"""Start a real gateway (in a background loop thread) for tests and examples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from kaiyuan.config import GatewayConfig, parse_config
from kaiyuan.gateway import Gateway
from kaiyuan.server.app import create_app
from kaiyuan.store.db import open_store
from kaiyuan.store.schema import request_log
from kaiyuan.testing.server_thread import ServerThread


@dataclass
class RunningGateway:
    url: str
    gateway: Gateway
    config: GatewayConfig
    servers: ServerThread

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def flush_logs(self) -> int:
        self.settle()
        return self.servers.call(self.gateway.request_log.flush())

    def settle(self, timeout: float = 10.0) -> None:
        """Wait (bounded) until no request is in flight: a stream's handler may still be reading
        the upstream to its end after the client has its whole answer."""
        import time

        deadline = time.monotonic() + timeout
        while self.gateway.metrics.in_flight._value.get() > 0 and time.monotonic() < deadline:
            time.sleep(0.005)

    def log_rows(self) -> list[dict[str, Any]]:
        self.flush_logs()
        assert self.gateway.engine is not None
        with self.gateway.engine.connect() as conn:
            return [dict(r) for r in conn.execute(select(request_log).order_by(request_log.c.ts)).mappings()]


def start_gateway(servers: ServerThread, config: dict[str, Any] | GatewayConfig, db_url: str) -> RunningGateway:
    cfg = config if isinstance(config, GatewayConfig) else parse_config({"store": {"url": db_url}, **config}, "<test>")
    engine = open_store(cfg.store.url)

    async def build() -> Gateway:  # providers' sessions belong to the server loop
        return Gateway(cfg, engine)

    gw = servers.call(build())
    app = create_app(cfg, gw)
    url = servers.serve(app, handler_cancellation=True)
    return RunningGateway(url, gw, cfg, servers)


def _limit_files(n: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatewayProcess:
    """``kaiyuan serve`` in a child process, as an operator runs it."""

    def __init__(self, config: dict[str, Any], workdir: str, port: int | None = None, env: dict[str, str] | None = None,
                 nofile: int | None = None) -> None:
        """``nofile``: the child's open-file limit (RLIMIT_NOFILE), as an operator's ``ulimit -n``."""
        import os
        import subprocess
        import sys
        from pathlib import Path

        import yaml

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg_path = Path(workdir) / f"kaiyuan-{self.port}.yaml"
        cfg_path.write_text(yaml.safe_dump(config))
        self.config_path = str(cfg_path)
        self.log_path = Path(workdir) / f"kaiyuan-{self.port}.log"
        # the child runs this checkout's kaiyuan (the one under test), not whichever is installed
        root = str(Path(__file__).resolve().parents[2])
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, full_env.get("PYTHONPATH")) if p)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kaiyuan", "serve", "--config", self.config_path, "--port", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=workdir,
            preexec_fn=None if nofile is None else lambda: _limit_files(nofile),
        )

    def wait_ready(self, timeout: float = 60) -> None:
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"gateway on {self.url} not ready: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except Exception:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return int(self.proc.returncode or 0)
