"""Trying a plan: deployments in strategy order, retries with backoff, then fallback models.

Per model, up to ``retries.max_attempts`` attempts: each goes to the best deployment not tried
yet that is usable now (policy allows it, breaker closed or probing, not cooling down after a
Retry-After, under max_concurrency/rpm/tpm). Once every usable deployment has been tried, the
best one is retried after a jittered exponential backoff. When the model is exhausted, its
fallbacks are tried in order (transitively). No attempt starts after ``retries.max_total_s`` of
the requested model.

Streams are only retried before their first byte: the executor waits for the upstream's first
chunk before committing, so a stream that stalls or breaks before it is retried elsewhere; once
a chunk may have reached the client, nothing is retried.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from kaiyuan.context import Attempt, RequestContext, Upstream
from kaiyuan.errors import ErrorKind, GatewayError, kind_for_upstream_status
from kaiyuan.offload import JSON_ERRORS, big, loads_in_pieces
from kaiyuan.providers.base import ChunkStream, Provider, UpstreamCall, UpstreamReply
from kaiyuan.redact import clip_scrubbed
from kaiyuan.routing.breaker import DeploymentHealth
from kaiyuan.routing.policy import Policy
from kaiyuan.routing.retry import (
    CONTENT_POLICY,
    CONTEXT_WINDOW,
    FINAL,
    RETRY,
    backoff,
    classify,
    retry_after_seconds,
)

if TYPE_CHECKING:
    from kaiyuan.routing.router import ModelRoute, Router, Slot

# The upstream call for a provider; an awaitable when a large body is translated off the loop (kaiyuan.offload).
Build = Callable[[Provider], UpstreamCall | Awaitable[UpstreamCall]]

MAX_COOLDOWN_S = 300.0
MAX_UPSTREAM_MESSAGE = 4096  # characters of an upstream's error message passed on


class _Run:
    """The state of one request's routing."""

    __slots__ = ("build", "caller", "cooldown_s", "ctx", "deadline", "last", "notes", "policy", "router", "tried_any")

    def __init__(self, router: Router, ctx: RequestContext, build: Build, policy: Policy | None, deadline: float) -> None:
        self.router = router
        self.ctx = ctx
        self.build = build
        self.policy = policy
        self.deadline = deadline
        self.last: GatewayError | None = None
        self.notes: list[str] = []  # why deployments/models were skipped, for the final error
        self.tried_any = False
        self.cooldown_s: float | None = None  # the soonest end of a cooldown among skipped deployments
        self.caller: str | None = None  # who is asking, for the breakers (worked out on first need)

    def who(self) -> str:
        if self.caller is None:
            self.caller = caller_of(self.ctx)
        return self.caller


def caller_of(ctx: RequestContext) -> str:
    """Who a request's failures are blamed on, for the breakers: its virtual key; else (the master
    key, or a gateway without keys) the client's address; trials' background calls are one caller, "trials"."""
    p = ctx.principal
    if ctx.background:
        return "trials"
    if p.key_id is not None and p.key_id != "master":
        return p.key_id
    return "client:" + (ctx.client or "unknown")


async def execute(router: Router, ctx: RequestContext, build: Build) -> tuple[Provider, UpstreamReply]:
    primary = router.routes.get(ctx.model or "")
    if primary is None:
        raise GatewayError(ErrorKind.NO_DEPLOYMENT, f"model {ctx.model!r} has no usable deployment (no deployment is configured)")
    policy = router.request_policy(ctx)
    run = _Run(router, ctx, build, policy, time.monotonic() + primary.settings.retries.max_total_s)
    chain: list[ModelRoute] = [primary]
    seen = {primary.name}
    principal = ctx.principal
    i = 0
    while i < len(chain):
        route = chain[i]
        i += 1
        verdict, result = await _try_model(run, route)
        if isinstance(result, tuple):
            if route is not primary:
                ctx.served_model = route.name
                router.metrics.fallbacks.labels(primary.name, route.name).inc()
            return result
        if verdict == FINAL:
            assert result is not None
            raise result
        if verdict == CONTEXT_WINDOW:
            nxt = route.settings.context_window_fallbacks
        elif verdict == CONTENT_POLICY:
            nxt = route.settings.content_policy_fallbacks
        else:
            nxt = route.settings.fallbacks
        if ctx.background:  # a trial call compares this model: another model's answer is no answer
            nxt = []
        if verdict != RETRY:
            if not nxt:
                assert result is not None
                raise result  # the upstream's verdict on this request, and no model to ask instead
            for dropped in chain[i:]:  # a refusal of the request itself: only the matching list can help
                seen.discard(dropped.name)
            del chain[i:]
        for name in nxt:
            if name in seen:
                continue
            seen.add(name)
            if not principal.may_use(name):
                run.notes.append(f"fallback {name!r} not allowed for this key")
                continue
            fb = router.routes.get(name)
            if fb is not None:
                chain.append(fb)
    raise _final_error(run, primary)


async def _try_model(run: _Run, route: ModelRoute) -> tuple[str, tuple[Provider, UpstreamReply] | GatewayError | None]:
    router = run.router
    cfg = route.settings.retries
    slots = router.allowed(route, run.policy)
    if not slots:
        run.notes.append(f"model {route.name!r}: no deployment satisfies the policy")
        return RETRY, None
    ordered = router.order(route, slots)
    tried: set[int] = set()
    attempts = 0
    retries = 0
    loops = 0
    while attempts < cfg.max_attempts and loops < 2 * cfg.max_attempts + 2:
        loops += 1
        if time.monotonic() >= run.deadline:
            run.notes.append(f"routing.retries.max_total_s ({cfg.max_total_s:g}s) reached")
            break
        now = router.now()
        pick: Slot | None = None
        again: Slot | None = None
        cooling: float | None = None
        for s in ordered:
            if s.provider.unavailable is not None:
                continue
            h = s.health
            if not h.available(now) or (h.cooling and h.cooling_for(run.who(), now)):
                if now < h.cooldown_until:
                    cooling = h.cooldown_until - now if cooling is None else min(cooling, h.cooldown_until - now)
                continue
            d = s.provider.deployment
            if h.over_capacity(now, d.rpm, d.tpm, d.max_concurrency) is not None:
                continue
            if id(s) not in tried:
                pick = s
                break
            if again is None:
                again = s
        if pick is None and again is not None:
            retries += 1
            delay = backoff(retries, cfg, router.rng)
            if time.monotonic() + delay >= run.deadline:
                break
            if delay > 0:
                await asyncio.sleep(delay)
                if not again.health.available(router.now()):  # e.g. another request took its probe slot
                    continue
            pick = again
        if pick is None:
            # Nothing usable now; wait for a Retry-After cooldown if it ends soon enough.
            if cooling is not None and cooling <= cfg.max_retry_after_s and time.monotonic() + cooling < run.deadline:
                await asyncio.sleep(cooling)
                continue
            if not tried:
                _note_unusable(run, route, ordered, now)
            break
        tried.add(id(pick))
        attempts += 1
        verdict, result = await _attempt(run, route, pick)
        if verdict == RETRY and not isinstance(result, tuple):
            if result is not None:
                run.last = result
            continue
        return verdict, result
    return RETRY, None


async def _attempt(run: _Run, route: ModelRoute, slot: Slot) -> tuple[str, tuple[Provider, UpstreamReply] | GatewayError | None]:
    ctx = run.ctx
    provider = slot.provider
    h = slot.health
    attempt = Attempt(provider.id, model=route.name)
    ctx.attempts.append(attempt)
    ctx.deployment = provider.id
    run.tried_any = True
    probe = h.acquire(run.router.now())
    t0 = time.perf_counter()
    try:
        call = run.build(provider)
        if not isinstance(call, UpstreamCall):  # a large body, translated in a worker thread
            call = await call
        remaining = run.deadline - time.monotonic()
        t = provider.deployment.timeouts
        if remaining >= t.first_byte + t.idle:
            # The deployment's own timeouts end this attempt before the request's deadline.
            reply = await _send(provider, call)
        else:
            async with asyncio.timeout(max(remaining, 0.001)):
                reply = await _send(provider, call)
    except GatewayError as e:  # (a stream that failed before its first byte is closed by _send)
        return _failed(run, attempt, h, probe, e, False, t0)
    except TimeoutError:
        err = GatewayError(
            ErrorKind.UPSTREAM_TIMEOUT,
            f"no answer from {provider.id} within the request's routing.retries.max_total_s "
            f"({route.settings.retries.max_total_s:g}s)",
        )
        return _failed(run, attempt, h, probe, err, False, t0)
    except BaseException:  # cancelled (the client went away): no verdict on the deployment
        h.release(probe)
        h.done()
        raise
    elapsed = time.perf_counter() - t0
    attempt.ms = elapsed * 1000
    attempt.status = reply.status
    if reply.status >= 300:
        err = upstream_error(provider, reply)
        return _failed(run, attempt, h, probe, err, True, t0)
    if reply.stream is None:
        bad = await _bad_large_body(provider, reply) if big(len(reply.body or b"")) else _bad_body(provider, reply)
        if bad is not None:
            return _failed(run, attempt, h, probe, bad, False, t0)
    h.success(probe, elapsed)
    # Opened here, closed by the pipeline (close_upstream): a stream's work ends when it is closed.
    ctx.upstream = Upstream(provider, reply, h if reply.stream is not None else None)
    ctx.deadline = reply.deadline
    if reply.stream is None:  # the whole body is here: the deployment's work is done
        h.done()
        if provider.deployment.tpm is not None and reply.parsed is not None:
            h.add_tokens(_usage_tokens(reply.parsed))
    return "ok", (provider, reply)


def _bad_body(provider: Provider, reply: UpstreamReply) -> GatewayError | None:
    """A 2xx whole body that is not a JSON object, or that carries an error object, is a failed
    attempt (502, retried elsewhere), not an answer to pass on. A good body is kept, parsed, in
    ``reply.parsed``: the handlers read usage from it instead of parsing the bytes again."""
    try:
        obj = orjson.loads(reply.body or b"")
    except orjson.JSONDecodeError:
        return _not_json(provider, reply)
    return _checked(provider, reply, obj)


async def _bad_large_body(provider: Provider, reply: UpstreamReply) -> GatewayError | None:
    """:func:`_bad_body` for a large body (``offload.OFF_LOOP_BYTES`` and more, up to
    ``max_response_bytes``): parsed a piece at a time, as large request bodies are, so that the loop
    keeps turning (one orjson call on 64 MiB of object-dense JSON holds it 0.4-1.5 s)."""
    try:
        obj = await loads_in_pieces(reply.body or b"")
    except (*JSON_ERRORS, RecursionError):
        return _not_json(provider, reply)
    return _checked(provider, reply, obj)


def _not_json(provider: Provider, reply: UpstreamReply) -> GatewayError:
    text = (reply.body or b"")[:200].decode("utf-8", "replace").strip()
    return GatewayError(ErrorKind.UPSTREAM_ERROR, f"upstream {provider.id} answered {reply.status} with a body "
                                                  f"that is not JSON: {text!r}")


def _checked(provider: Provider, reply: UpstreamReply, obj: Any) -> GatewayError | None:
    if not isinstance(obj, dict):
        return GatewayError(ErrorKind.UPSTREAM_ERROR, f"upstream {provider.id} answered {reply.status} with JSON that "
                                                      f"is not an object")
    err = obj.get("error")
    if err:
        msg = err.get("message") if isinstance(err, dict) else err
        return GatewayError(ErrorKind.UPSTREAM_ERROR, f"upstream {provider.id} answered {reply.status} with an error: {msg}")
    reply.parsed = obj
    return None


def _usage_tokens(obj: dict[str, Any]) -> int:
    try:
        usage = obj.get("usage") or {}
        return int(usage.get("total_tokens") or (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0))
    except (AttributeError, TypeError, ValueError):
        return 0


def _failed(
    run: _Run, attempt: Attempt, h: DeploymentHealth, probe: bool, err: GatewayError, from_reply: bool,
    t0: float,
) -> tuple[str, GatewayError]:
    attempt.ms = (time.perf_counter() - t0) * 1000
    attempt.status = err.status
    attempt.error = err.message
    verdict = classify(err, from_reply)
    if verdict == RETRY:
        ra = retry_after_seconds(err.headers) if from_reply else None
        h.failure(probe, err.message, min(ra, MAX_COOLDOWN_S) if ra is not None else None, run.who())
    else:
        h.success(probe, None)  # it answered: the deployment is up, the request was refused
    h.done()
    return verdict, err


async def _send(provider: Provider, call: UpstreamCall) -> UpstreamReply:
    """Send, and for a 2xx stream wait for its first chunk (the point after which no retry is safe)."""
    reply = await provider.send(call)
    if reply.status < 300 and reply.stream is not None:
        try:
            first = await _first_chunk(reply.stream, provider.id)
        except BaseException:
            await reply.aclose()
            raise
        if isinstance(reply.stream, ChunkStream):  # the transport's reader takes it back: no wrapper
            reply.stream.unread(first)
        else:
            reply.stream = _prefixed(first, reply.stream, reply)
    return reply


async def _first_chunk(stream: AsyncIterator[bytes], label: str) -> bytes:
    while True:
        try:
            chunk = await stream.__anext__()
        except StopAsyncIteration:
            raise GatewayError(
                ErrorKind.UPSTREAM_ERROR, f"upstream {label} ended the stream before sending anything"
            ) from None
        if chunk:
            return chunk


async def _prefixed(first: bytes, rest: AsyncIterator[bytes], reply: UpstreamReply) -> AsyncIterator[bytes]:
    reply.received = len(first)
    yield first
    async for chunk in rest:
        reply.received += len(chunk)
        yield chunk


async def close_upstream(ctx: RequestContext) -> None:
    """Close the reply the executor opened for ``ctx`` (the one place it is closed). For a stream,
    the deployment's request ends now: its in-flight count, its tokens, and a stream that broke
    after its first byte counts as a failure. A stream the client had whole may keep its connection."""
    up, ctx.upstream = ctx.upstream, None
    if up is None:
        return
    ctx.upstream_bytes = up.reply.bytes_received()
    try:
        await up.reply.aclose(finished=ctx.answered)
    finally:
        h = up.health
        if h is not None:
            h.done()
            u = ctx.usage
            if u.prompt_tokens or u.completion_tokens:
                h.add_tokens((u.prompt_tokens or 0) + (u.completion_tokens or 0))
            if ctx.stream and ctx.error is not None and ctx.status >= 500 and not ctx.cancelled:
                h.failure(False, ctx.error, caller=caller_of(ctx))


def _note_unusable(run: _Run, route: ModelRoute, ordered: list[Slot], now: float) -> None:
    for s in ordered:
        if s.provider.unavailable is not None:
            why = s.provider.unavailable
        else:
            d = s.provider.deployment
            why = s.health.over_capacity(now, d.rpm, d.tpm, d.max_concurrency) or ""
            if now < s.health.cooldown_until:
                left = s.health.cooldown_until - now
                why = f"cooling down for {left:.1f}s ({s.health.cooldown_reason})"
                run.cooldown_s = left if run.cooldown_s is None else min(run.cooldown_s, left)
            elif not s.health.available(now):
                why = f"circuit {s.health.state} ({s.health.reason})"
            elif s.health.cooling and s.health.cooling_for(run.who(), now):
                left = s.health.cooling[run.who()] - now
                why = (f"cooling down for {left:.1f}s for this caller only: the recent failures there were all "
                       f"this caller's requests (routing.breaker.min_callers {s.health.cfg.min_callers})")
                run.cooldown_s = left if run.cooldown_s is None else min(run.cooldown_s, left)
        run.notes.append(f"{route.name}/{s.provider.id}: {why}")


def _final_error(run: _Run, primary: ModelRoute) -> GatewayError:
    ctx = run.ctx
    router = run.router
    excluded = ""
    if ctx.policy:
        allowed = router.allowed(primary, run.policy)
        out = [f"{s.provider.id} (fails {_why_not(run.policy, primary.policy, s.tags)})" for s in primary.slots if s not in allowed]
        excluded = f"; excluded by policy: {', '.join(out)}" if out else ""
    notes = "; ".join(run.notes)
    if run.last is None or not run.tried_any:
        reason = "policy" if ctx.policy else "unhealthy"
        router.metrics.refusals.labels(primary.name, reason).inc()
        if ctx.policy:
            msg = (
                f"no deployment allowed by data policy {ctx.policy!r} can take this request for model "
                f"{primary.name!r} now ({notes or 'none configured'}){excluded}; the request was not sent elsewhere"
            )
            code = "policy_unsatisfied"
        else:
            msg = f"model {primary.name!r} has no usable deployment now ({notes or 'none configured'})"
            code = "no_healthy_deployment"
        # cooling down after an upstream's 429 / Retry-After: tell the caller when to come back
        headers = {"Retry-After": str(math.ceil(run.cooldown_s))} if run.cooldown_s is not None else None
        return GatewayError(ErrorKind.NO_DEPLOYMENT, msg, code=code, headers=headers)
    last = run.last
    n = len(ctx.attempts)
    msg = f"model {primary.name!r}: all {n} attempt(s) failed; last: {last.message}"
    if notes:
        msg += f" ({notes})"
    if excluded:
        # The policy kept the request from deployments that might have answered: say so, as a 503.
        router.metrics.refusals.labels(primary.name, "policy").inc()
        return GatewayError(
            ErrorKind.NO_DEPLOYMENT,
            f"no deployment allowed by data policy {ctx.policy!r} could answer: {msg}{excluded}; "
            f"the request was not sent elsewhere",
            headers=last.headers, code="policy_unsatisfied",
        )
    return GatewayError(last.kind, msg, status=last.status, headers=last.headers, code=last.code, upstream_type=last.upstream_type)


def _why_not(request: Policy | None, model: Policy | None, tags: frozenset[str]) -> str:
    for pol in (request, model):
        if pol is not None and not pol.allows(tags):
            return pol.why_not(tags)
    return "?"


UPSTREAM_413_CODE = "upstream_request_too_large"


def upstream_error(provider: Provider, reply: UpstreamReply) -> GatewayError:
    """Turn an upstream non-2xx reply into an error that keeps its status, message and Retry-After."""
    message = None
    up_type = None
    code = None
    try:
        data = orjson.loads(reply.body or b"")
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            message = err.get("message")
            up_type = err.get("type")
            code = err.get("code")
        elif isinstance(err, str):
            message = err
        elif isinstance(data, dict) and isinstance(data.get("message"), str):
            message = data["message"]
    except orjson.JSONDecodeError:
        text = (reply.body or b"")[:300].decode("utf-8", "replace").strip()
        message = text or None
    if isinstance(message, str):  # an upstream message is shown to a person: bounded, and cheap to scrub
        message = clip_scrubbed(message, MAX_UPSTREAM_MESSAGE)
    if reply.truncated:
        message = f"{message or ''} (error body cut at {len(reply.body or b'')} bytes: max_error_bytes)".lstrip()
    status = reply.status
    headers = {}
    if reply.headers:
        for k in ("Retry-After", "retry-after-ms"):
            v = reply.headers.get(k)
            if v:
                headers[k] = v
    msg = f"upstream {provider.id} returned {status}" + (f": {message}" if message else "")
    if code is None and status == 413:  # the upstream's limit, not this gateway's (code request_too_large)
        code = UPSTREAM_413_CODE
    return GatewayError(
        kind_for_upstream_status(status),
        msg,
        status=status,
        headers=headers,
        upstream_type=up_type if isinstance(up_type, str) else None,
        code=str(code) if code is not None else None,
    )
