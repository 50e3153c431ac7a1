"""The gateway runtime: config, providers, router, guard, metrics and request log, wired once at start."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from kaiyuan.accounting.guard import KeyGuard
from kaiyuan.config import GatewayConfig, ModelConfig
from kaiyuan.context import RequestContext
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.guard import Guard
from kaiyuan.observability.metrics import Metrics
from kaiyuan.observability.request_log import RequestLogWriter
from kaiyuan.observability.tracing import Tracer
from kaiyuan.providers.base import Provider, UpstreamCall, UpstreamReply
from kaiyuan.providers.registry import build_provider
from kaiyuan.redact import install_log_redaction, register_secrets, secrets_of
from kaiyuan.routing.executor import upstream_error
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
        self.router = Router(self.providers, self.models, self.metrics.registry)
        key_guard = KeyGuard(self)  # master key + virtual keys, limits, budgets, cost
        self.guard: Guard = key_guard
        self.caps = key_guard.caps  # each request's output cap: reserved and sent upstream
        self.request_log = RequestLogWriter(engine, config.request_log, self.metrics)
        self.on_complete: list[CompletionHook] = []
        # Called first in model_config (after auth): may rewrite ctx.model (trials: canary, promote)
        # or flag the request in ctx.extra (trials: shadow sampling). Must be fast and not raise.
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

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.gather(*(p.start() for ps in self.providers.values() for p in ps))
        for name, ps in self.providers.items():
            for p in ps:
                if p.unavailable:
                    log.warning("model %s: deployment %s is unavailable: %s", name, p.id, p.unavailable)
        await self.request_log.start()
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        await self.request_log.close()
        await self.guard.close()
        await asyncio.gather(*(p.close() for ps in self.providers.values() for p in ps), return_exceptions=True)
        if self.tracer is not None:
            self.tracer.shutdown()

    # -- the request path ------------------------------------------------------------------
    def model_config(self, ctx: RequestContext) -> ModelConfig:
        for hook in self.pre_route:
            hook(ctx)
        m = self.models.get(ctx.model or "")
        if m is None:
            names = ", ".join(sorted(self.models)) or "(none configured)"
            raise GatewayError(
                ErrorKind.NOT_FOUND,
                f"model {ctx.model!r} does not exist on this gateway; available models: {names}",
                param="model",
                code="model_not_found",
            )
        allowed = ctx.principal.allowed_models
        if allowed is not None and m.name not in allowed:
            raise GatewayError(
                ErrorKind.PERMISSION,
                f"this key may not use model {m.name!r}; allowed: {', '.join(sorted(allowed))}",
                param="model",
                code="model_not_allowed",
            )
        ctx.log_bodies = m.log_bodies
        return m

    def reachable_models(self, model: str) -> list[str]:
        """Every model a request for ``model`` can be answered by: itself, a pre_route target,
        and their fallbacks at any depth."""
        out = list(self.router.reachable(model))
        for hook in self.route_targets:
            for target in hook(model):
                out += [m for m in self.router.reachable(target) if m not in out]
        return out

    async def execute(self, ctx: RequestContext, build: Callable[[Provider], UpstreamCall]) -> tuple[Provider, UpstreamReply]:
        """Route the request: strategy order, retries, breakers, fallbacks and data policy
        (see :mod:`kaiyuan.routing.executor`). Returns the deployment that answered 2xx and its
        reply; raises the error the caller should see."""
        return await self.router.execute(ctx, build)

    def finish(self, ctx: RequestContext) -> None:
        """Record the outcome of a request (metrics, request log, completion hooks). Never raises."""
        try:
            self.metrics.observe(ctx, self.models)
            self.request_log.submit(ctx)
            for hook in self.on_complete:
                hook(ctx)
        except Exception:  # pragma: no cover - accounting must never break the response
            log.exception("failed to record request %s", ctx.request_id)

    def public_models(self) -> list[dict[str, Any]]:
        out = []
        for name, m in self.models.items():
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
