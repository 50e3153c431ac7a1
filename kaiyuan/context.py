"""The per-request record that flows through the pipeline (:mod:`kaiyuan.pipeline`).

Every stage fills typed fields here: who is calling (``principal``), what was asked (``model``,
``body``), the trial hooks' decisions (``trial_*``), the reservation (``ticket``), the upstream
reply (``upstream``, opened by the executor and closed by the pipeline), usage and cost. There is
no dict of string keys: a new stage adds a field, so a typo is a type error, not a silent miss.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kaiyuan.accounting.output_cap import OutputAsk
    from kaiyuan.limits.counters import Ticket
    from kaiyuan.providers.base import Provider, UpstreamReply
    from kaiyuan.routing.breaker import DeploymentHealth


@dataclass(slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    cache_write_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: filled by authentication. ``None`` fields mean "not known / no limit".
    Immutable: one is shared by every request of a cached key (and ``ANONYMOUS`` by the others)."""

    key_id: str | None = None
    team_id: str | None = None
    user_id: str | None = None
    is_admin: bool = False
    allowed_models: frozenset[str] | None = None
    policy: str | None = None
    key_name: str | None = None

    def may_use(self, model: str) -> bool:
        """The one rule for allowed models (the pipeline, fallbacks, /v1/models and trials ask it)."""
        return self.allowed_models is None or model in self.allowed_models


ANONYMOUS = Principal()  # a request no key names (an open gateway; before authentication)


@dataclass(slots=True)
class Attempt:
    deployment: str
    status: int | None = None
    error: str | None = None
    ms: float | None = None
    model: str | None = None  # the public model the deployment serves (differs on fallback)


@dataclass(slots=True)
class Upstream:
    """The reply the executor opened for this request, and whose health it counts against. The
    pipeline closes it in one place (:func:`kaiyuan.routing.executor.close_upstream`)."""

    provider: Provider
    reply: UpstreamReply
    health: DeploymentHealth | None = None  # set for a stream: its deployment's work ends when it is closed


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
    model: str | None = None  # the public model name (after the trial hooks: what is served)
    requested_model: str | None = None  # the model the caller asked for
    stream: bool = False
    principal: Principal = ANONYMOUS
    policy: str | None = None
    client: str | None = None  # the client's address, when no virtual key names the caller (breakers)
    background: bool = False  # a trial mirror or judge call: no client, no caller's budget
    deployment: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    served_model: str | None = None  # the fallback model that answered, when not ``model``
    omitted_tools: str | None = None  # /v1/responses: hosted tools left out of the upstream call
    # /v1/responses: the stored conversation ``previous_response_id`` continues (input items), read
    # before the reservation, and it as JSON (with raw_body, it bounds the prompt an upstream may claim)
    carried: list[dict[str, Any]] | None = None
    carried_bytes: bytes = b""
    mirror_request: Any = None  # trials: the canonical request a shadow call replays (/v1/responses)
    status: int = 0
    error: str | None = None
    cancelled: bool = False
    answered: bool = False  # the client has its whole answer (a later hang-up is no cancellation)
    dropped: bool = False  # the gateway dropped a client that did not read its answer (server.deadline)
    ttft: float | None = None  # seconds from arrival to the first byte/token sent to the client
    usage: Usage = field(default_factory=Usage)
    cost_usd: float | None = None
    pricer: Callable[[RequestContext], float | None] | None = None  # prices ctx.usage (x-kaiyuan-cost)
    # (what was priced, its cost): the x-kaiyuan-cost header's pricing, reused by the settle when the
    # usage is still the one it priced (accounting.costing.Costing.cost)
    priced: tuple[tuple[Any, ...], float | None] | None = None
    prompt_estimate: int | None = None  # prompt tokens counted at reservation
    ask: OutputAsk | None = None  # the caller's output cap and n, read once (accounting.output_cap.ask_of)
    tokens_reserved: int | None = None  # tokens reserved against TPM limits (prompt + output cap x n)
    ticket: Ticket | None = None  # the reservation to settle
    log_bodies: bool = False
    capture_response: bool = False  # keep the answer in response_body (trials: sampled requests)
    response_body: bytes | None = None
    trial: str | None = None
    trial_arm: str | None = None  # canary: "candidate" | "incumbent"
    trial_canary_judge: bool = False
    trial_promoted: str | None = None  # the promoted trial that rewrote the model
    trial_shadow: tuple[str, ...] = ()  # shadow trials that sampled this request
    upstream: Upstream | None = None
    deadline: float | None = None  # monotonic end of the upstream reply's timeouts.total (covers the relay too)
    output_cap: int | None = None  # the output cap (per completion) sent to the deployment called last
    choices: int = 1  # completions asked for (OpenAI n)
    upstream_bytes: int = 0  # bytes the upstream sent (set when its reply is closed; bounds usage claims)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def prompt_body(self) -> dict[str, Any]:
        """The request as its prompt is counted: the body, with the conversation it continues."""
        if self.carried is None:
            return self.body
        return {**self.body, "input": [self.carried, self.body.get("input")]}

    def mark_first_byte(self) -> None:
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.started
