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
        return self.servers.call(self.gateway.request_log.flush())

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
