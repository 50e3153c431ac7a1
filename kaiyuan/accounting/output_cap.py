"""The output cap of a request: decided once, reserved, and sent upstream.

A budget can only hold if the number of output tokens the gateway reserves for is the number the
upstream is told it may produce. So one function decides the cap for a (request, deployment) pair,
the guard reserves ``cap x n`` from it, and every upstream call carries that same cap, in every
field its protocol has (``max_tokens`` and ``max_completion_tokens`` for OpenAI-compatible chat,
``max_tokens`` for Anthropic, ``generationConfig.maxOutputTokens`` for Gemini).

- The caller's cap: ``max_completion_tokens`` when given (OpenAI documents it as the successor of
  the deprecated ``max_tokens``), else ``max_tokens``, else ``max_output_tokens``.
- No cap given: the deployment's default, so the reservation is finite: Anthropic deployments'
  ``default_max_tokens`` (plus the thinking budget ``reasoning_effort`` asks for), the local
  engine's ``max_tokens_default``, else the model's ``max_output_tokens`` from the price catalog,
  else ``accounting.default_max_output_tokens``. That default is *sent* only where output costs
  money: a deployment with no output price (self-hosted at 0, or unpriced, which budgeted keys
  cannot use) gets the caller's request unchanged, because servers such as vLLM refuse a cap
  larger than the context left; its reservation still uses the default (for TPM).
- ``n`` (OpenAI chat/completions) multiplies the output: n completions of up to ``cap`` each.
- Never above the model's output limit (the deployment's ``max_output_tokens``, else its price's,
  from config or the catalog): agents ask 32k or 64k of models whose APIs refuse more than their
  limit, so a larger cap is clamped to it (and so is what is reserved).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

from kaiyuan.config import (
    AccountingSettings,
    AnthropicDeployment,
    DeploymentBase,
    LocalDeployment,
    OpenAICompatibleDeployment,
)

if TYPE_CHECKING:
    from kaiyuan.context import RequestContext

# OpenAI reasoning_effort -> Anthropic thinking budget (kaiyuan.dialects.openai_chat.EFFORT_BUDGET)
_EFFORT_BUDGET = {"none": 0, "minimal": 1024, "low": 1024, "medium": 4096, "high": 16384, "xhigh": 32768}
NO_OUTPUT_ENDPOINTS = frozenset({"embeddings", "count_tokens"})
BOTH = ("max_tokens", "max_completion_tokens")
# Hosts that refuse a chat call carrying both fields (400 "cannot both be set"): host suffix -> fields.
ONE_FIELD_HOSTS = (
    ("api.openai.com", ("max_completion_tokens",)),
    (".openai.azure.com", ("max_completion_tokens",)),
    ("volces.com", ("max_tokens",)),
)


class OutputAsk(NamedTuple):
    """What the caller asked for: its own cap (None: the deployment's default applies) and n.
    (A named tuple: one is made per request, and a frozen dataclass costs several times more to make.)"""

    cap: int | None
    n: int = 1
    thinking: int = 0  # the thinking budget an OpenAI caller's reasoning_effort adds on Anthropic


NO_OUTPUT = OutputAsk(0, 1)
CAP_KEYS = ("max_completion_tokens", "max_tokens", "max_output_tokens")  # the first that is set counts


def _positive_int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else None


def ask_of(ctx: RequestContext) -> OutputAsk:
    """``asked(ctx.body, ctx.endpoint)``, read once per request (the reservation, the upstream call
    and the pricing of an answer without usage all need it)."""
    a = ctx.ask
    if a is None:
        a = ctx.ask = asked(ctx.body, ctx.endpoint)
    return a


def asked(body: dict[str, Any], endpoint: str) -> OutputAsk:
    """The caller's output cap and n, read from an OpenAI or Anthropic body. Tolerant: a field of
    the wrong type counts as absent here (the dialect's validator answers it with a 400)."""
    if endpoint in NO_OUTPUT_ENDPOINTS:
        return NO_OUTPUT
    cap = None
    for key in CAP_KEYS:
        v = body.get(key)
        if type(v) is int and v >= 1:  # _positive_int, inline: every request asks (a JSON int is an int)
            cap = v
            break
    if cap is None:
        gc = body.get("generationConfig")  # Gemini callers
        if isinstance(gc, dict):
            cap = _positive_int(gc.get("maxOutputTokens"))
    n = body.get("n")
    if type(n) is not int or n < 1:  # not clamped: an upstream that accepts n=500 bills 500
        n = 1
    effort = body.get("reasoning_effort")
    if effort is None and isinstance(body.get("reasoning"), dict):  # the Responses API's reasoning.effort
        effort = body["reasoning"].get("effort")
    thinking = _EFFORT_BUDGET.get(effort, 0) if isinstance(effort, str) else 0
    return tuple.__new__(OutputAsk, (cap, n, thinking))  # (the named tuple's __new__ is a Python function)


class OutputCaps:
    """Each deployment's default cap, worked out once at start."""

    def __init__(self, defaults: dict[str, int], anthropic: frozenset[str],
                 fields: dict[str, tuple[str, ...]] | None = None, free: frozenset[str] = frozenset(),
                 limits: dict[str, int] | None = None) -> None:
        self.defaults = defaults
        self.anthropic = anthropic  # deployments whose default grows by the thinking budget
        self.fields = fields or {}  # OpenAI-compatible deployments that take one field, not both
        self.free = free  # deployments whose output costs nothing: no default cap is sent to them
        self.limits = limits or {}  # the model's output limit, where known

    @classmethod
    def build(cls, deployments: list[tuple[str, DeploymentBase, int | None, bool]], acc: AccountingSettings) -> OutputCaps:
        """``deployments``: (id, config, the catalog's max_output_tokens for it or None, whether
        its output has a price above 0)."""
        defaults: dict[str, int] = {}
        anthropic = set()
        free = set()
        fields: dict[str, tuple[str, ...]] = {}
        limits: dict[str, int] = {}
        for did, dep, catalog_max, paid in deployments:
            if not paid:
                free.add(did)
            limit = dep.max_output_tokens or catalog_max
            if limit:
                limits[did] = limit
            if isinstance(dep, OpenAICompatibleDeployment):
                fields[did] = cap_fields(dep)
            if isinstance(dep, AnthropicDeployment):
                defaults[did] = dep.default_max_tokens
                anthropic.add(did)
            elif isinstance(dep, LocalDeployment):
                defaults[did] = dep.max_tokens_default
            else:
                defaults[did] = catalog_max or acc.default_max_output_tokens
        return cls(defaults, frozenset(anthropic), fields, frozenset(free), limits)

    def cap(self, deployment: str, ask: OutputAsk, fallback: int = 8192) -> int:
        """The output cap (per completion) sent to ``deployment`` and reserved for it."""
        if ask.cap is not None:
            limit = self.limits.get(deployment)
            return min(ask.cap, limit) if limit else ask.cap
        base = self.defaults.get(deployment, fallback)
        return base + ask.thinking if deployment in self.anthropic else base

    def sent(self, deployment: str, ask: OutputAsk) -> int | None:
        """The cap sent to ``deployment`` (and enforced on its answer); None: the caller's request
        goes unchanged (no cap asked, and the deployment's output is free)."""
        if ask.cap is None and deployment in self.free and deployment not in self.anthropic:
            return None
        return self.cap(deployment, ask)

    def reserved_output(self, deployment: str, ask: OutputAsk) -> int:
        """Output tokens to reserve on ``deployment``: the cap times n."""
        return self.cap(deployment, ask) * ask.n


    def set_openai(self, deployment: str, body: dict[str, Any], endpoint: str, cap: int) -> None:
        """Write ``cap`` into an OpenAI-protocol body (a copy the caller owns). Chat has two fields
        and upstreams honour one or the other, so both carry the same number, except on hosts that
        refuse the pair (there the other field is removed); legacy completions has one."""
        if endpoint == "chat":
            use = self.fields.get(deployment, BOTH)
            for f in BOTH:
                if f in use:
                    body[f] = cap
                else:
                    body.pop(f, None)
        elif endpoint == "completions":
            body["max_tokens"] = cap


def cap_fields(dep: OpenAICompatibleDeployment) -> tuple[str, ...]:
    """The output-cap field(s) an OpenAI-compatible deployment's chat calls carry."""
    if dep.max_tokens_fields is not None:
        return BOTH if dep.max_tokens_fields == "both" else (dep.max_tokens_fields,)
    host = (urlsplit(dep.base_url).hostname or "").lower()
    for suffix, fields in ONE_FIELD_HOSTS:
        bare = suffix.lstrip(".")
        if host == bare or host.endswith("." + bare):
            return fields
    return BOTH
