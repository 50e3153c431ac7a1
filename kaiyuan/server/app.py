"""The app factory and the server runner."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable

from aiohttp import web

from kaiyuan import background
from kaiyuan.config import GatewayConfig
from kaiyuan.dialects import anthropic as anth
from kaiyuan.dialects import gemini_in
from kaiyuan.dialects import openai as oai
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.gateway import Gateway
from kaiyuan.observability import malloc_trim
from kaiyuan.pipeline import GATEWAY_KEY, record_unknown_route
from kaiyuan.routing import admin as routing_admin
from kaiyuan.server import anthropic_api, drain, fast_routes, gemini_api, health, openai_api, responses_api
from kaiyuan.server.common import ErrorSerializer, error_response, request_too_large
from kaiyuan.server.connections import ConnectionLimiter, default_max_connections
from kaiyuan.server.workers import supervisor_pid

log = logging.getLogger("kaiyuan.server")

# Which error shape a path's callers expect; the first matching prefix wins.
ERROR_SHAPES: list[tuple[str, ErrorSerializer]] = []
RouteInstaller = Callable[[web.Application], None]
# Other API families (Anthropic, admin, ...) register here; each installs its own routes.
EXTRA_ROUTES: list[RouteInstaller] = []

from kaiyuan.console.install import install as install_console  # noqa: E402  (the /ui console and its data)
from kaiyuan.server import admin_api  # noqa: E402  (the admin API: keys, teams, budgets, spend)

EXTRA_ROUTES.append(admin_api.add_routes)
EXTRA_ROUTES.append(install_console)
EXTRA_ROUTES.append(anthropic_api.add_routes)
EXTRA_ROUTES.append(responses_api.add_routes)
ERROR_SHAPES.append(("/v1/messages", anth.error_body))
EXTRA_ROUTES.append(gemini_api.add_routes)
ERROR_SHAPES.append(("/v1beta", gemini_in.error_body))


def _serializer_for(path: str) -> ErrorSerializer:
    for prefix, ser in ERROR_SHAPES:
        if path.startswith(prefix):
            return ser
    return oai.error_body


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        ser = _serializer_for(request.path)
        if e.status in (404, 405):
            record_unknown_route(request, e.status)
        if e.status == 404:
            err = GatewayError(ErrorKind.NOT_FOUND, f"no such endpoint: {request.method} {request.path}", code="unknown_url")
        elif e.status == 405:
            allowed = e.headers.get("Allow", "")
            err = GatewayError(
                ErrorKind.METHOD_NOT_ALLOWED,
                f"{request.method} is not allowed on {request.path}; use {allowed or 'another method'}",
                status=405,
                code="method_not_allowed",
            )
        elif e.status == 413:
            err = request_too_large(request.app[GATEWAY_KEY].config.server.max_body_bytes)
        else:
            err = GatewayError(ErrorKind.INVALID_REQUEST, e.text or e.reason, status=e.status)
        return error_response(err, ser)


def _load_plugins() -> None:
    """Import optional modules that register into EXTRA_ROUTES (trials)."""
    import importlib

    for mod in ("kaiyuan.trials.server",):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def create_app(config: GatewayConfig, gateway: Gateway | None = None) -> web.Application:
    """Build the aiohttp application. The gateway's store, providers and log writer start with it."""
    app = web.Application(
        middlewares=[error_middleware],
        client_max_size=config.server.max_body_bytes + 1024,
        # auto_decompress off: request bodies are decoded by server.common.decode_body, so that a
        # Content-Encoding aiohttp cannot decode (br without Brotli) is an error in the caller's dialect
        handler_args={"max_field_size": 65536, "auto_decompress": False},
    )
    gw = gateway or Gateway(config, engine=None)
    app[GATEWAY_KEY] = gw
    openai_api.add_routes(app)
    health.add_routes(app)
    routing_admin.add_routes(app)
    _load_plugins()
    for install in EXTRA_ROUTES:
        install(app)

    async def on_startup(_app: web.Application) -> None:
        await gw.start()

    async def on_cleanup(_app: web.Application) -> None:
        await gw.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def build_gateway(config: GatewayConfig) -> Gateway:
    """Open the store (running migrations) and build the gateway for ``config``."""
    from kaiyuan.store.db import open_store

    engine = open_store(config.store.url)
    return Gateway(config, engine)


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def warn_if_open(config: GatewayConfig, host: str) -> bool:
    """Say loudly at start when anyone who can reach the port can use the gateway (no master key,
    listening beyond loopback). True when it warned."""
    if config.server.master_key is not None or host in LOOPBACK_HOSTS or host.startswith("127."):
        return False
    log.warning(
        "NO MASTER KEY: the gateway listens on %s without server.master_key, so anyone who can reach it can "
        "call every model at your expense (the admin API stays closed). Set server.master_key, or listen "
        "on 127.0.0.1 only.", host,
    )
    return True


GC_GEN0_THRESHOLD = 5_000


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap on the hot path, once the gateway has started.

    Measured (``perf record -e cpu-clock`` at c=64): with CPython's defaults the collector took 15%
    of the gateway's CPU. Every request allocates a few hundred objects, so a young-generation pass
    ran every few requests, and each older pass walked the whole start-up heap (config, pydantic
    models, SQLAlchemy, the price catalog). ``gc.freeze()`` moves that heap out of the collector's
    sight, and a young generation of 5,000 objects makes the passes rarer; reference counting still
    frees almost everything at once, and cycles (tracebacks, cancelled tasks) are collected as
    before, a little later."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold(), gen1, gen2)


def gen0_threshold() -> int:
    """``KAIYUAN_GC_GEN0`` (objects) when set to a whole number of at least 100, else the default: a
    larger young generation means rarer but longer collection pauses (tail latency at low load)."""
    v = os.environ.get("KAIYUAN_GC_GEN0", "")
    return int(v) if v.isdigit() and int(v) >= 100 else GC_GEN0_THRESHOLD


PARENT_CHECK_S = 1.0


async def exit_with_parent(parent: int, stop: Callable[[], None], every_s: float = PARENT_CHECK_S) -> None:
    """Call ``stop`` once the process ``parent`` is not (or no longer) this process's parent: it
    died and the process was re-parented. Checked every ``every_s`` seconds."""
    while os.getppid() == parent:  # noqa: ASYNC110 - no event tells a process its parent died
        await asyncio.sleep(every_s)
    log.warning("the supervisor (pid %d) is gone: this worker drains and stops", parent)
    stop()


async def run_server(config: GatewayConfig, host: str, port: int, ready: Callable[[str], None] | None = None,
                     sock: socket.socket | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain: stop accepting, let in-flight requests and streams
    finish for up to ``server.shutdown_grace_s``, flush the logs. ``sock``: a listening socket to
    accept on instead of binding ``host:port`` (a worker of ``kaiyuan serve --workers``)."""
    warn_if_open(config, host)
    gw = build_gateway(config)
    app = create_app(config, gw)
    srv = config.server
    runner = web.AppRunner(
        app,
        handler_cancellation=True,  # a client that disconnects cancels its upstream request
        access_log=log if srv.access_log else None,
        keepalive_timeout=srv.header_timeout_s,  # also the time a new connection has to send its head
        shutdown_timeout=srv.shutdown_grace_s,  # SIGTERM: in-flight requests and streams may finish
    )
    await runner.setup()
    fast_routes.install(runner)
    loop = asyncio.get_running_loop()
    assert runner.server is not None
    limiter = ConnectionLimiter(runner.server, srv.max_connections or default_max_connections(), loop)
    try:  # not a web.TCPSite: the limiter is the protocol factory (server.connections)
        if sock is not None:  # a worker of `kaiyuan serve --workers`: the supervisor's socket
            server = await loop.create_server(limiter, sock=sock, backlog=4096)
        else:
            server = await loop.create_server(limiter, host, port, backlog=4096, reuse_address=True)
    except BaseException:
        await runner.cleanup()  # close upstream pools and flush the log before reporting the error
        raise
    addrs = [s.getsockname() for s in server.sockets]
    actual_port = addrs[0][1] if addrs else port
    url = f"http://{host}:{actual_port}"
    if ready is not None:
        ready(url)
    tune_gc()
    trimming = malloc_trim.start(srv.malloc_trim_interval_s)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-main thread / Windows
            pass
    # A worker of `kaiyuan serve --workers`: a supervisor killed outright (SIGKILL, OOM) cannot
    # tell its workers to stop, so each one watches for it and drains when it is gone.
    parent = supervisor_pid() if sock is not None else None
    orphan_watch = asyncio.create_task(exit_with_parent(parent, stop.set)) if parent is not None else None
    try:
        await stop.wait()
    finally:
        if orphan_watch is not None:
            orphan_watch.cancel()
        await background.stop(trimming)
        server.close()  # stop accepting: with --workers, the other workers take new connections
        if stop.is_set():  # answer on open connections with Connection: close for a short grace (server.drain)
            await drain.connections(limiter, min(srv.drain_idle_grace_s, srv.shutdown_grace_s))
        log.info("shutting down: flushing the request log")
        await runner.cleanup()
