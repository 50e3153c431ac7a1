"""The per-request record that flows through the pipeline: parse -> auth -> plan -> call -> settle -> log."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kaiyuan.providers.base import UpstreamReply


@dataclass(slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    cache_write_tokens: int | None = None


@dataclass(slots=True)
class Principal:
    """Who is calling: filled by the guard (auth). ``None`` fields mean "not known / no limit"."""

    key_id: str | None = None
    team_id: str | None = None
    user_id: str | None = None
    is_admin: bool = False
    allowed_models: frozenset[str] | None = None
    policy: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Attempt:
    deployment: str
    status: int | None = None
    error: str | None = None
    ms: float | None = None
    model: str | None = None  # the public model the deployment serves (differs on fallback)


@dataclass(slots=True)
class RequestContext:
    request_id: str
    dialect: str  # the caller's wire format: "openai" | "anthropic"
    endpoint: str  # "chat" | "completions" | "embeddings" | "messages" | "count_tokens"
    started: float = field(default_factory=time.perf_counter)
    started_wall: float = field(default_factory=time.time)
    body: dict[str, Any] = field(default_factory=dict)
    raw_body: bytes = b""
    headers: Any = None  # the inbound request headers (case-insensitive mapping)
    model: str | None = None  # the public model name
    stream: bool = False
    principal: Principal = field(default_factory=Principal)
    policy: str | None = None
    deployment: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    status: int = 0
    error: str | None = None
    cancelled: bool = False
    ttft: float | None = None  # seconds from arrival to the first byte/token sent to the client
    usage: Usage = field(default_factory=Usage)
    cost_usd: float | None = None
    pricer: Callable[[RequestContext], float | None] | None = None  # set by the guard; prices ctx.usage
    log_bodies: bool = False
    response_body: bytes | None = None
    trial: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    reply: UpstreamReply | None = None  # the upstream's reply, closed when the handler ends
    output_cap: int | None = None  # the output cap (per completion) sent to the deployment called last
    choices: int = 1  # completions asked for (OpenAI n)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def mark_first_byte(self) -> None:
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.started
