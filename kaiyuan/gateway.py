"""The gateway runtime: config, providers, router, auth, reservations, ledger, metrics and request
log, wired once at start. The request path that uses them is :mod:`kaiyuan.pipeline`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from kaiyuan import background
from kaiyuan.accounting.auth import Authenticator
from kaiyuan.accounting.costing import Costing
from kaiyuan.accounting.ledger import SpendLedger
from kaiyuan.accounting.reservations import Reservations
from kaiyuan.config import GatewayConfig, ModelConfig
from kaiyuan.context import Principal, RequestContext
from kaiyuan.observability import multiproc
from kaiyuan.observability.log_sink import open_request_log
from kaiyuan.observability.metrics import Metrics
from kaiyuan.observability.tracing import Tracer
from kaiyuan.providers.base import Provider, UpstreamReply
from kaiyuan.providers.registry import build_provider
from kaiyuan.redact import install_log_redaction, register_secrets, secrets_of
from kaiyuan.routing.executor import Build, upstream_error
from kaiyuan.routing.retry import RETRYABLE_STATUSES
from kaiyuan.routing.router import Router

log = logging.getLogger("kaiyuan")

__all__ = ["RETRYABLE_STATUSES", "Gateway", "upstream_error"]
CompletionHook = Callable[[RequestContext], None]


class Gateway:
    def __init__(self, config: GatewayConfig, engine: Engine | None = None) -> None:
        self.config = config
        self.engine = engine
        register_secrets(secrets_of(config))  # scrubbed from every error, log row, span and log line
        install_log_redaction()
        self.metrics = Metrics()
        self.models: dict[str, ModelConfig] = {m.name: m for m in config.models}
        self.providers: dict[str, list[Provider]] = {
            m.name: [build_provider(d) for d in m.deployments] for m in config.models
        }
        self.router = Router(self.providers, self.models, self.metrics.registry,
                             cny_per_usd=config.accounting.cny_per_usd)
        self.costing = Costing(config.models, config.accounting)
        self.ledger = SpendLedger(engine, config.accounting.spend_flush_interval_s, self.metrics.store)
        limits = config.limits
        self.auth = Authenticator(config.server.master_key, engine, limits.key_cache_ttl_s, self.metrics.denied)
        self.caps = self.costing.caps  # each request's output cap: reserved and sent upstream
        self.reservations = Reservations(limits, self.costing, engine, self.auth.loads, self.metrics.registry,
                                         self.metrics.denied, self.ledger, self.reachable_models)
        self.auth.redis = self.reservations.redis  # key invalidations travel on the counters' Redis
        self.auth.relay = self.reservations.shared  # or, between workers, on the supervisor's socket
        self.request_log = open_request_log(engine, config.request_log, self.metrics.store)
        self.on_complete: list[CompletionHook] = []
        # Run by the pipeline's resolve step (after auth): may rewrite ctx.model (trials: canary,
        # promote) or flag the request (trials: shadow sampling). Must be fast and not raise.
        self.pre_route: list[CompletionHook] = []
        # Models a pre_route hook may send a request for model X to (trials: canary and promote
        # targets); budgets reserve over them too.
        self.route_targets: list[Callable[[str], list[str]]] = []
        self.tracer: Tracer | None = None
        if config.tracing.enabled:
            t = config.tracing
            self.tracer = Tracer(t.exporter, t.endpoint, t.service_name)
            self.on_complete.append(self.tracer.record)
        self.ready = False
        self.started_at = time.time()
        self._metrics_sync: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.gather(*(p.start() for ps in self.providers.values() for p in ps))
        for name, ps in self.providers.items():
            for p in ps:
                if p.unavailable:
                    log.warning("model %s: deployment %s is unavailable: %s", name, p.id, p.unavailable)
        await self.request_log.start()
        self.auth.start()
        self._metrics_sync = multiproc.start_syncing()  # a supervisor's worker: values reach the shared files
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        await self.request_log.close()
        await background.stop(self._metrics_sync)  # it syncs once more as it stops
        await self.auth.close()
        await self.ledger.close()
        await self.reservations.close()
        await asyncio.gather(*(p.close() for ps in self.providers.values() for p in ps), return_exceptions=True)
        if self.tracer is not None:
            self.tracer.shutdown()

    # -- the request path (see kaiyuan.pipeline) --------------------------------------------
    def reachable_models(self, model: str) -> tuple[str, ...]:
        """Every model a request for ``model`` can be answered by: itself, a pre_route target,
        and their fallbacks at any depth."""
        reach = self.router.reachable(model)
        if not self.route_targets:  # (no trial targets: the router's own tuple, made once)
            return reach
        out = list(reach)
        for hook in self.route_targets:
            for target in hook(model):
                out += [m for m in self.router.reachable(target) if m not in out]
        return tuple(out)

    async def execute(self, ctx: RequestContext, build: Build) -> tuple[Provider, UpstreamReply]:
        """Route the request: strategy order, retries, breakers, fallbacks and data policy
        (see :mod:`kaiyuan.routing.executor`). Returns the deployment that answered 2xx and its
        reply; raises the error the caller should see."""
        return await self.router.execute(ctx, build)

    def record_spend(self, ctx: RequestContext, cost: float) -> None:
        """Queue the ledger row of a priced request and count its spend."""
        pd = self.costing.deployments.get(ctx.deployment or "")
        self.ledger.record(ctx, cost, pd.deployment.model if pd else None, pd.vendor if pd else None)
        if cost:
            self.metrics.child(self.metrics.spend, ctx.model or "").inc(cost)

    def finish(self, ctx: RequestContext) -> None:
        """Record the outcome of a request (metrics, request log, completion hooks). Never raises."""
        try:
            self.metrics.observe(ctx, self.models)
            self.request_log.submit(ctx)
            for hook in self.on_complete:
                hook(ctx)
        except Exception:  # pragma: no cover - accounting must never break the response
            log.exception("failed to record request %s", ctx.request_id)

    def public_models(self, principal: Principal) -> list[dict[str, Any]]:
        """The models ``principal`` may use, as /v1/models lists them."""
        out = []
        for name, m in self.models.items():
            if not principal.may_use(name):
                continue
            provs = self.providers[name]
            usable = [p for p in provs if p.unavailable is None]
            entry: dict[str, Any] = {
                "id": name,
                "object": "model",
                "created": int(self.started_at),
                "owned_by": "kaiyuan",
                "available": bool(usable),
                "deployments": [p.id for p in provs],
            }
            if not usable:
                entry["unavailable_reason"] = "; ".join(p.unavailable or "" for p in provs)
            if m.description:
                entry["description"] = m.description
            out.append(entry)
        return out
