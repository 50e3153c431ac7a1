"""A gateway object (no HTTP server) with a virtual key that has RPM, TPM and a monthly budget,
counted in process: the keyed request path's admit and settle without an upstream
(tests/test_keys_hot_path.py, tests/test_keys_round5.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from kaiyuan.accounting import keystore
from kaiyuan.config import GatewayConfig, parse_config
from kaiyuan.gateway import Gateway
from kaiyuan.store.db import open_store

MASTER = "sk-master-test"
PRICE = {"input": 1.0, "output": 2.0}
BODY = {"model": "m", "messages": [{"role": "user", "content": "Say hello in one short sentence."}], "max_tokens": 64}

Scenario = Callable[[Gateway, str], Awaitable[Any]]


def keyed_setup(db: Path, upstream_model: str, limit_usd: float = 10**6) -> tuple[GatewayConfig, Any, str]:
    """The config (model ``m``, one priced deployment of ``upstream_model``), its store and a new key."""
    cfg = parse_config({
        "server": {"master_key": MASTER},
        "store": {"url": f"sqlite:///{db}"},
        "limits": {"backend": "memory", "key_cache_ttl_s": 3600},
        "accounting": {"spend_flush_interval_s": 3600},
        "models": [{"name": "m", "deployments": [{"id": "m-dep", "provider": "openai_compatible",
                                                  "base_url": "http://127.0.0.1:9/v1", "model": upstream_model,
                                                  "price": PRICE}]}],
    }, "<test>")
    engine = open_store(cfg.store.url)
    key = keystore.create_key(engine, {"name": "k", "rpm": 10**9, "tpm": 10**12},
                              [{"period": "month", "limit_usd": limit_usd}])["key"]
    return cfg, engine, key


def run_keyed(cfg: GatewayConfig, engine: Any, key: str, scenario: Scenario) -> Any:
    """Run ``scenario`` on a gateway that lives and is closed on the scenario's event loop."""
    async def main() -> Any:
        gw = Gateway(cfg, engine)
        try:
            return await scenario(gw, key)
        finally:
            await gw.close()

    return asyncio.run(main())
