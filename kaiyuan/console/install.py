"""Registers the console with the app: its admin API data routes, the /ui pages, the rollup task."""

from __future__ import annotations

from aiohttp import web

from kaiyuan.console import api, data, oidc, pages, trials_pages
from kaiyuan.console.access import SESSIONS_KEY
from kaiyuan.console.rollup import RollupTask
from kaiyuan.console.session import Sessions, derive_secret
from kaiyuan.observability import log_sink
from kaiyuan.server.openai_api import GATEWAY_KEY


def install(app: web.Application) -> None:
    gw = app[GATEWAY_KEY]
    cfg = gw.config
    api.add_routes(app)
    if cfg.server.master_key is not None:
        app[SESSIONS_KEY] = Sessions(derive_secret(cfg.console.session_secret, cfg.server.master_key), cfg.console.session_ttl_s)
    if gw.engine is not None:
        state = api.ConsoleState(gw.engine, data.Catalogue(cfg), RollupTask(gw.engine, cfg.console.rollup_interval_s))
        app[api.STATE_KEY] = state

        async def start(_app: web.Application) -> None:
            if not log_sink.shipped():  # a supervisor's worker: the supervisor rolls up (server/workers.py)
                state.rollup.start()

        async def stop(_app: web.Application) -> None:
            await state.rollup.close()

        app.on_startup.append(start)
        app.on_cleanup.append(stop)
    if cfg.console.enabled:
        pages.add_routes(app)
        trials_pages.add_routes(app)
        oidc.add_routes(app)
