"""``kaiyuan serve --workers N``: every core, one command.

The supervisor (this module, in the process the user started) validates the config, runs the
store's migrations once, binds the listening socket once, and starts N worker processes that all
accept on that socket (each one a whole gateway: ``kaiyuan serve`` with the socket handed down as
a file descriptor). It keeps the state that must be exact across workers with no Redis: the
rate-limit and budget counters (:mod:`kaiyuan.limits.shared`), and a Prometheus multiprocess
directory, so ``/metrics`` on any worker reports the sum of all of them.

Signals:
- SIGTERM / SIGINT: graceful shutdown. Workers stop accepting, finish in-flight requests and
  streams for up to ``server.shutdown_grace_s``, flush their logs and exit.
- SIGHUP: graceful reload. The config file is read again; if it is valid, a new set of workers
  starts on the same socket and, once each has said it is ready, the old set drains as above. No
  connection is refused in between. An invalid config is logged and the old workers keep serving.

A worker that dies is started again (with a short back-off); its in-flight reservations are counted
as spent, so a crash can never overspend a budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kaiyuan import background
from kaiyuan.config import ConfigError, GatewayConfig, load_config
from kaiyuan.observability import malloc_trim, multiproc
from kaiyuan.observability.log_sink import ENV_LOG_SOCKET, LogSink

log = logging.getLogger("kaiyuan.workers")

ENV_LISTEN_FD = "KAIYUAN_LISTEN_FD"
ENV_READY_FD = "KAIYUAN_READY_FD"
ENV_SUPERVISOR_PID = "KAIYUAN_SUPERVISOR_PID"  # a worker stops when this process is no longer its parent
ENV_METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable
RESPAWN_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)


def default_workers() -> int:
    """The number of cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def bind(host: str, port: int) -> socket.socket:
    """The one listening socket every worker accepts on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    ready_r: int  # our end of the pipe the worker writes "ready" to
    generation: int
    started: float = field(default_factory=time.monotonic)
    stopping: bool = False


class Supervisor:
    def __init__(self, config_path: str | None, config: GatewayConfig, argv: list[str], n: int,
                 sock: socket.socket, state_dir: Path) -> None:
        self.config_path = config_path
        self.config = config
        self.argv = argv  # the worker command line, without the fd options
        self.n = n
        self.sock = sock
        self.state_dir = state_dir
        self.metrics_dir = state_dir / "metrics"
        self.counters_path = str(state_dir / "counters.sock")
        self.log_path = str(state_dir / "log.sock")
        self.workers: list[Worker] = []
        self.generation = 0
        self.stop = asyncio.Event()
        self.reload = asyncio.Event()
        self.failures = 0

    # -- workers -------------------------------------------------------------------------------
    def spawn(self) -> Worker:
        r, w = os.pipe()
        env = {**os.environ, ENV_LISTEN_FD: str(self.sock.fileno()), ENV_READY_FD: str(w), ENV_SUPERVISOR_PID: str(os.getpid()),
               ENV_METRICS_DIR: str(self.metrics_dir)}
        from kaiyuan.limits.shared import ENV_SOCKET

        if self.config.limits.backend != "redis":
            env[ENV_SOCKET] = self.counters_path
        env[ENV_LOG_SOCKET] = self.log_path
        proc = subprocess.Popen(self.argv, env=env, pass_fds=(self.sock.fileno(), w))
        os.close(w)
        worker = Worker(proc, r, self.generation)
        self.workers.append(worker)
        return worker

    async def wait_ready(self, worker: Worker, limit_s: float) -> bool:
        loop = asyncio.get_running_loop()

        def read() -> bytes:
            with contextlib.suppress(OSError):
                return os.read(worker.ready_r, 16)
            return b""

        try:
            data = await asyncio.wait_for(loop.run_in_executor(None, read), limit_s)
        except TimeoutError:
            return False
        return data.startswith(b"ready")

    def terminate(self, worker: Worker) -> None:
        worker.stopping = True
        if worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGTERM)

    async def start_generation(self) -> bool:
        """Start N workers of a new generation; True when all of them came up. A worker that dies
        before it is ready is started again, up to three times (a bad config fails every try)."""
        self.generation += 1
        ok = await asyncio.gather(*(self._start_one() for _ in range(self.n)))
        return all(ok)

    async def _start_one(self) -> bool:
        for _ in range(3):
            w = self.spawn()
            if await self.wait_ready(w, 120):
                return True
            if w.proc.poll() is None:  # alive but silent for two minutes
                w.proc.kill()
            self.reap(w)
        return False

    async def drain(self, old: list[Worker]) -> None:
        for w in old:
            self.terminate(w)
        limit = time.monotonic() + self.config.server.shutdown_grace_s + 10
        while any(w.proc.poll() is None for w in old) and time.monotonic() < limit:  # noqa: ASYNC110 (polls child processes)
            await asyncio.sleep(0.1)
        for w in old:
            if w.proc.poll() is None:
                log.warning("worker %d did not stop in time; killing it", w.proc.pid)
                w.proc.kill()
            self.reap(w)

    def reap(self, w: Worker) -> None:
        w.proc.wait()
        with contextlib.suppress(OSError):
            os.close(w.ready_r)
        if w in self.workers:
            self.workers.remove(w)
        _mark_dead(w.proc.pid)

    # -- the loop ------------------------------------------------------------------------------
    async def run(self) -> int:
        from kaiyuan.console.rollup import RollupTask
        from kaiyuan.limits.shared import CounterServer

        server = CounterServer(self.counters_path)
        await server.start()
        sink = self._log_sink()
        await sink.start()
        # The console's hourly rollup reads the whole open hour of the log every pass: here, next to
        # the log's writer, once per machine, not in every worker (where it took the serving core
        # and, in the soak, grew each worker's RSS by a few MiB).
        rollup = RollupTask(sink.engine, self.config.console.rollup_interval_s)
        syncing = multiproc.start_syncing()
        trimming = malloc_trim.start(self.config.server.malloc_trim_interval_s)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload.set)
        try:
            if not await self.start_generation():
                log.error("workers did not start; see their errors above")
                await self.drain(list(self.workers))
                return 1
            log.info("%d workers ready (pids %s)", self.n, ", ".join(str(w.proc.pid) for w in self.workers))
            rollup.start()  # once a worker has migrated the store
            while not self.stop.is_set():
                await self._tick()
            await self.drain(list(self.workers))
            return 0
        finally:
            await rollup.close()
            await server.close()
            await sink.close()
            await background.stop(syncing)  # it syncs once more as it stops
            await background.stop(trimming)

    def _log_sink(self) -> LogSink:
        """The workers' one request-log writer (:mod:`kaiyuan.observability.log_sink`). Its settings
        and store are the config's at start: a reload does not move them."""
        from prometheus_client import CollectorRegistry

        from kaiyuan.store.batch_writer import WriterMetrics
        from kaiyuan.store.db import make_engine

        metrics = WriterMetrics(CollectorRegistry())  # counted in the multiprocess directory, like a worker's
        return LogSink(self.log_path, make_engine(self.config.store.url), self.config.request_log, metrics)

    async def _tick(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake(), 0.5)
        if self.reload.is_set():
            self.reload.clear()
            await self._reload()
        for w in list(self.workers):
            if w.proc.poll() is not None and not w.stopping and not self.stop.is_set():
                code = w.proc.returncode
                self.reap(w)
                self.failures += 1
                delay = RESPAWN_BACKOFF_S[min(self.failures, len(RESPAWN_BACKOFF_S)) - 1]
                log.error("worker %d exited with %s; starting another in %.1fs", w.proc.pid, code, delay)
                await asyncio.sleep(delay)
                self.spawn()
            elif time.monotonic() - w.started > 60:
                self.failures = 0

    async def _wake(self) -> None:
        stop = asyncio.ensure_future(self.stop.wait())
        reload = asyncio.ensure_future(self.reload.wait())
        try:
            await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            reload.cancel()

    async def _reload(self) -> None:
        try:
            config = load_config(self.config_path)
        except ConfigError as e:
            log.error("SIGHUP: the new config is not valid, keeping the running one: %s", e)
            return
        old = [w for w in self.workers if not w.stopping]
        self.config = config
        if not await self.start_generation():
            log.error("SIGHUP: the new workers did not start; keeping the running ones")
            await self.drain([w for w in self.workers if w.generation == self.generation])
            return
        log.info("SIGHUP: config reloaded; %d new workers serving, the old ones are draining", self.n)
        await self.drain(old)


def _mark_dead(pid: int) -> None:
    """Let the multiprocess metrics forget a dead worker's live gauges."""
    if os.environ.get(ENV_METRICS_DIR) is None:
        return
    with contextlib.suppress(Exception):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def serve(config_path: str | None, config: GatewayConfig, host: str, port: int, n: int,
          worker_argv: list[str]) -> int:
    """Run the supervisor until SIGTERM/SIGINT. ``worker_argv`` starts one worker (``kaiyuan serve``)."""
    from kaiyuan.store.db import open_store

    open_store(config.store.url).dispose()  # migrations, once, before any worker opens the store
    try:
        sock = bind(host, port)
    except OSError as e:
        print(f"error: cannot listen on {host}:{port}: {e.strerror or e} (pick another --port?)", file=sys.stderr)
        return 1
    state = Path(tempfile.mkdtemp(prefix="kaiyuan-workers-"))  # 0700: the counter socket lives here
    (state / "metrics").mkdir()
    os.environ[ENV_METRICS_DIR] = str(state / "metrics")
    multiproc.install()  # the supervisor's own metrics (its request-log writer's) are summed in too
    actual = sock.getsockname()[1]
    print(f"Kaiyuan supervisor on http://{host}:{actual} with {n} workers (pid {os.getpid()}; "
          "SIGHUP reloads the config, SIGTERM drains and stops)", file=sys.stderr, flush=True)
    sup = Supervisor(config_path, config, worker_argv, n, sock, state)
    try:
        return asyncio.run(sup.run())
    finally:
        sock.close()
        shutil.rmtree(state, ignore_errors=True)


def inherited_socket_fd() -> int | None:
    fd = os.environ.get(ENV_LISTEN_FD)
    return int(fd) if fd else None


def inherited_socket() -> socket.socket | None:
    """In a worker: the listening socket the supervisor handed down, if any (taken once: the
    worker's own child processes do not inherit the variable)."""
    fd = inherited_socket_fd()
    if fd is None:
        return None
    del os.environ[ENV_LISTEN_FD]
    return socket.socket(fileno=fd)


def supervisor_pid() -> int | None:
    """In a worker: the supervisor's pid (taken once, like the socket). A worker started just as
    its supervisor died already has another parent; comparing with this pid catches that too."""
    pid = os.environ.pop(ENV_SUPERVISOR_PID, None)
    return int(pid) if pid and pid.isdigit() else None


def say_ready() -> None:
    """In a worker: tell the supervisor this worker accepts requests."""
    fd = os.environ.pop(ENV_READY_FD, None)
    if fd:
        with contextlib.suppress(OSError):
            os.write(int(fd), b"ready\n")
            os.close(int(fd))
