"""OpenTelemetry tracing, off the hot path.

When enabled, each finished request becomes one ``kaiyuan.request`` span (with GenAI semantic
convention attributes) and one child span per upstream attempt, built from the timings the
request already recorded — so tracing adds no work while the request is in flight.

Exporters: ``console`` (stderr, for trying it out), ``otlp`` (needs
``pip install opentelemetry-exporter-otlp-proto-http``; endpoint from the config or the standard
``OTEL_EXPORTER_OTLP_ENDPOINT``), and ``memory`` (tests).
"""

from __future__ import annotations

import time
from typing import Any

from kaiyuan.context import RequestContext
from kaiyuan.redact import clip, scrub


class Tracer:
    def __init__(self, exporter: str, endpoint: str | None = None, service_name: str = "kaiyuan") -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.memory: Any = None
        if exporter == "memory":
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

            self.memory = InMemorySpanExporter()
            self.provider.add_span_processor(SimpleSpanProcessor(self.memory))
        elif exporter == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            self.provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif exporter == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError as e:
                raise RuntimeError(
                    "tracing.exporter 'otlp' needs: pip install opentelemetry-exporter-otlp-proto-http"
                ) from e
            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()))
        else:
            raise ValueError(f"unknown tracing exporter {exporter!r}")
        self.tracer = self.provider.get_tracer("kaiyuan")

    def record(self, ctx: RequestContext) -> None:
        from opentelemetry.trace import Status, StatusCode, set_span_in_context

        end_ns = time.time_ns()
        start_ns = int(ctx.started_wall * 1e9)
        attrs: dict[str, Any] = {
            "kaiyuan.request_id": ctx.request_id,
            "kaiyuan.dialect": ctx.dialect,
            "kaiyuan.endpoint": ctx.endpoint,
            "http.response.status_code": ctx.status,
            "gen_ai.request.model": clip(ctx.model, 256) or "",
            "kaiyuan.stream": ctx.stream,
            "kaiyuan.cancelled": ctx.cancelled,
        }
        if ctx.deployment:
            attrs["kaiyuan.deployment"] = ctx.deployment
        if ctx.usage.prompt_tokens is not None:
            attrs["gen_ai.usage.input_tokens"] = ctx.usage.prompt_tokens
        if ctx.usage.completion_tokens is not None:
            attrs["gen_ai.usage.output_tokens"] = ctx.usage.completion_tokens
        if ctx.ttft is not None:
            attrs["kaiyuan.ttft_ms"] = round(ctx.ttft * 1000, 3)
        if ctx.cost_usd is not None:
            attrs["kaiyuan.cost_usd"] = ctx.cost_usd
        span = self.tracer.start_span("kaiyuan.request", start_time=start_ns, attributes=attrs)
        if ctx.status >= 400 or ctx.error:
            span.set_status(Status(StatusCode.ERROR, clip(scrub(ctx.error), 2000) if ctx.error else str(ctx.status)))
        parent = set_span_in_context(span)
        t = start_ns
        for a in ctx.attempts:
            dur = int((a.ms or 0) * 1e6)
            child = self.tracer.start_span(
                "kaiyuan.upstream_attempt", context=parent, start_time=t,
                attributes={"kaiyuan.deployment": a.deployment, "http.response.status_code": a.status or 0},
            )
            if a.error:
                child.set_status(Status(StatusCode.ERROR, clip(scrub(a.error), 2000)))
            child.end(end_time=t + dur)
            t += dur
        span.end(end_time=end_ns)

    def shutdown(self) -> None:
        self.provider.shutdown()
