"""Private Redis and PostgreSQL servers that a fault test may stop, restart, pause and resume
(the shared servers of scripts/test-services.sh must stay up for every other test).

Each needs its binary: ``redis-server``, and PostgreSQL's ``initdb`` / ``pg_ctl`` (found under
/usr/lib/postgresql or via KAIYUAN_TEST_POSTGRES_BIN). Tests skip with a reason without them.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, up: bool, timeout_s: float = 20.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not go {'up' if up else 'down'} within {timeout_s} s")


class PrivateRedis:
    """redis-server on a fixed port, in memory only: a restart comes back empty."""

    def __init__(self, workdir: Path) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed")
        self.port = free_port()
        self.dir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait_port(self.port, True)

    def stop(self) -> None:
        if self.proc is not None:
            self.resume()
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            _wait_port(self.port, False)

    def restart_empty(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)


class PrivatePostgres:
    """A throw-away PostgreSQL cluster that can be stopped and started again (data kept until
    :meth:`remove`). It lives in a fresh directory under /tmp that the postgres user can write
    (pytest's tmp_path is private to root)."""

    def __init__(self) -> None:
        bins = [os.environ.get("KAIYUAN_TEST_POSTGRES_BIN", ""), *sorted(glob.glob("/usr/lib/postgresql/*/bin"))]
        self.bin = next((b for b in bins if b and os.path.exists(os.path.join(b, "initdb"))), None)
        if self.bin is None:
            pytest.skip("PostgreSQL (initdb, pg_ctl) is not installed")
        self.port = free_port()
        self.sock = Path(tempfile.mkdtemp(prefix="kaiyuan-pg-"))
        os.chmod(self.sock, 0o777)
        self.dir = self.sock / "pg"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        cmd = [os.path.join(self.bin or "", args[0]), *args[1:]]
        if os.getuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> None:
        if not self.dir.exists():
            self._run("initdb", "-D", str(self.dir), "-U", "postgres", "-A", "trust")
        self._run("pg_ctl", "-D", str(self.dir), "-l", str(self.sock / "pg.log"), "-w", "-o",
                  f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir), "-m", "immediate", "-w", "stop")
        _wait_port(self.port, False)

    def remove(self) -> None:
        """Stop the server if it runs, and delete its files."""
        try:
            self.stop()
        except (subprocess.CalledProcessError, RuntimeError):
            pass
        shutil.rmtree(self.sock, ignore_errors=True)
