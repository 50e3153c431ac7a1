"""Live trials inside the gateway: shadow mirroring, canary splits and promote/rollback overrides.

Hot path: ``pre_route`` (two dict lookups when no trial concerns the model) and ``on_complete``
(schedules a background task, never awaits). Shadow and judge calls run in background tasks with
bounded concurrency, after the client's response is complete, and respect the request's data
policy. Results and spend are written in batches by a background loop, never on a request's path.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import time
from collections import Counter, deque
from dataclasses import replace
from typing import Any

import orjson

from kaiyuan.context import Principal, RequestContext
from kaiyuan.dialects import anthropic as anth
from kaiyuan.dialects import canonical as c
from kaiyuan.dialects import openai_chat as oc
from kaiyuan.errors import GatewayError
from kaiyuan.gateway import Gateway
from kaiyuan.providers.base import Provider, UpstreamCall
from kaiyuan.routing.executor import close_upstream
from kaiyuan.server import translate
from kaiyuan.store.batch_writer import BatchWriter, WriterSpec
from kaiyuan.trials.capture import answer_of, judge_request, snapshot
from kaiyuan.trials.evaluate import (
    CallOutcome,
    build_scorers,
    catalog_for,
    evaluate,
    has_price,
    price_of,
    usage_tokens,
)
from kaiyuan.trials.guard import Breach, Watch
from kaiyuan.trials.models import REPLAY_HEADER, REPLAY_PREFIX, TrialConfig, check_trial_models
from kaiyuan.trials.policy import allowed, request_policy
from kaiyuan.trials.scorers import Scorer, answer_from_json
from kaiyuan.trials.store import RoutingState, TrialStore

log = logging.getLogger("kaiyuan.trials")

REFRESH_S = float(os.environ.get("KAIYUAN_TRIALS_REFRESH_S", "5"))
FLUSH_S = 1.0
MAX_QUEUE = 10_000  # trial rows held in memory while the database is slow or down
FORWARDED_HEADERS = ("anthropic-beta",)  # as the Messages handler forwards them to an Anthropic upstream
# where the client's answer bytes are captured (and, for /v1/responses, the canonical request)
CAPTURED = (("openai", "chat"), ("anthropic", "messages"), ("openai", "responses"))
QUEUE_FACTOR = 16  # pending shadow tasks per trial beyond max_concurrency x this are dropped (counted)


def sticky_unit(ctx: RequestContext, salt: str, by: str = "user") -> float:
    """A number in [0, 1) fixed per user (``user`` field, else key) or per conversation (first message)."""
    body = ctx.body
    key: Any = None
    if by == "user":
        meta = body.get("metadata")
        key = body.get("user") or (meta.get("user_id") if isinstance(meta, dict) else None) or ctx.principal.user_id
    if not key:
        msgs = body.get("messages")
        key = orjson.dumps(msgs[0]) if isinstance(msgs, list) and msgs else ctx.request_id
    raw = (salt + "\0").encode() + (key if isinstance(key, bytes) else str(key).encode())
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big") / 2**64


class TrialsRuntime:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.store = TrialStore(gw.engine) if gw.engine is not None else None
        self.trials: dict[str, TrialConfig] = {t.name: t for t in gw.config.trials}
        self.by_incumbent: dict[str, list[TrialConfig]] = {}
        self.overrides: dict[str, RoutingState] = {}  # incumbent model -> latest promote
        self.watches: dict[str, Watch] = {}  # guarded trial -> its current watch window
        self.halted: set[str] = set()  # canary trials whose latest routing action is a rollback
        self._states: dict[str, RoutingState] = {}  # latest routing action per trial
        self.scorers: dict[str, dict[str, Scorer]] = {}
        self.spent: dict[str, float] = {}
        self.counters: dict[str, Counter[str]] = {}
        self.sems: dict[str, asyncio.Semaphore] = {}
        self.pending: Counter[str] = Counter()
        self.tasks: set[asyncio.Task[None]] = set()
        # bounded, written by the shared batch writer: results may be dropped when the queue is full
        # (counted); spend is money, so it is held and a full queue stops new trial calls (exhausted)
        self._rows: BatchWriter[dict[str, Any]] = BatchWriter(
            WriterSpec("trial_result", MAX_QUEUE, 500, FLUSH_S, "drop"), self._write_results, gw.metrics.store)
        self._spend: BatchWriter[dict[str, Any]] = BatchWriter(
            WriterSpec("trial_spend", MAX_QUEUE, 500, FLUSH_S, "hold"), self._write_spend, gw.metrics.store)
        self._to_watch: deque[dict[str, Any]] = deque(maxlen=MAX_QUEUE)  # results the guards have not seen yet
        self._loop_task: asyncio.Task[None] | None = None
        self.rng = random.Random()
        self._index()
        catalog_for(gw.config)  # load the price catalog now, not in the first background call
        for t in self.trials.values():
            self._warn_unpriced(t)

    def _warn_unpriced(self, t: TrialConfig) -> None:
        if t.budget_usd is None or t.mode == "offline":
            return
        judged_canary = t.mode == "canary" and t.judge is not None and t.canary_judge_rate > 0
        for model in [*t.candidates, *([t.judge.model] if t.judge else []), *([t.incumbent] if judged_canary else [])]:
            if not has_price(model, t, self.gw.config):
                log.warning("trial %s: no price for %s (not in trials[].prices, the deployment's price or the price "
                            "catalog); its calls cost 'unknown' and budget_usd cannot stop them", t.name, model)

    # -- configuration ------------------------------------------------------------------------
    def _index(self) -> None:
        by: dict[str, list[TrialConfig]] = {}
        for t in self.trials.values():
            if t.enabled and t.mode in ("shadow", "canary") and t.sample_rate > 0:
                by.setdefault(t.incumbent, []).append(t)
            self.counters.setdefault(t.name, Counter())
            self.sems.setdefault(t.name, asyncio.Semaphore(t.max_concurrency))
            if t.name not in self.scorers:
                try:
                    self.scorers[t.name] = build_scorers(t)
                except ValueError as e:
                    log.error("trial %s: %s; scoring with the judge only", t.name, e)
                    self.scorers[t.name] = {}
        self.by_incumbent = by
        self._sync_watches(self._states)

    def add_trial(self, t: TrialConfig) -> None:
        check_trial_models([t], set(self.gw.models))
        self.trials[t.name] = t
        self.scorers.pop(t.name, None)
        self.sems[t.name] = asyncio.Semaphore(t.max_concurrency)
        self._index()

    def remove_trial(self, name: str) -> None:
        self.trials.pop(name, None)
        self._index()

    def apply_routing(self, states: dict[str, RoutingState]) -> None:
        out: dict[str, RoutingState] = {}
        for st in states.values():
            if st.action == "promote" and st.incumbent in self.gw.models and st.candidate in self.gw.models:
                prev = out.get(st.incumbent)
                if prev is None or st.ts > prev.ts:
                    out[st.incumbent] = st
        self.overrides = out
        self._states = states
        self.halted = {name for name, st in states.items() if st.action == "rollback"}
        self._sync_watches(states)

    def _sync_watches(self, states: dict[str, RoutingState]) -> None:
        """One watch window per guarded trial: from its latest promotion, else from the start of
        its canary; none while it is rolled back."""
        watches: dict[str, Watch] = {}
        for t in self.trials.values():
            st = states.get(t.name)
            if t.guard is None or (st is not None and st.action == "rollback"):
                continue
            since = st.ts if st is not None else 0.0
            if st is None and t.mode != "canary":
                continue  # a shadow trial's candidate answers no one until it is promoted
            cur = self.watches.get(t.name)
            watches[t.name] = cur if cur is not None and cur.since == since and cur.settings == t.guard else \
                Watch(t.guard, t.alpha, since)
        self.watches = watches

    async def _watch(self, rows: list[dict[str, Any]]) -> None:
        """Feed the guards; roll back (recorded, applied, logged) on a breach."""
        for row in rows:
            w = self.watches.get(row["trial"])
            if w is None or row["source"] not in ("canary", "promoted"):
                continue
            breach = w.observe(row)
            if breach is not None:
                await self._auto_rollback(self.trials[row["trial"]], row["candidate"], breach)

    async def _auto_rollback(self, t: TrialConfig, candidate: str, breach: Breach) -> None:
        log.warning("trial %s: automatic rollback of %s: %s", t.name, candidate, breach.note())
        self.counters[t.name]["guard_rollbacks"] += 1
        if self.store is None:  # no database: this gateway alone goes back to the incumbent
            self.halted.add(t.name)
            self.overrides = {k: v for k, v in self.overrides.items() if v.trial != t.name}
            return
        store = self.store
        await asyncio.to_thread(store.record_routing, t.name, "rollback", t.incumbent, candidate, [0.0], 0.0,
                                "guard", breach.note())
        self.apply_routing(await asyncio.to_thread(store.routing_states))

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        if self.store is not None:
            await self._refresh()
        self._loop_task = asyncio.create_task(self._run(), name="kaiyuan-trials")

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.flush()

    async def _run(self) -> None:
        last_refresh = time.monotonic()
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                await self.flush()
                if self.store is not None and time.monotonic() - last_refresh >= REFRESH_S:
                    last_refresh = time.monotonic()
                    await self._refresh()
            except Exception:
                log.exception("trials: background flush/refresh failed; will retry")

    async def _refresh(self) -> None:
        assert self.store is not None
        store = self.store
        states = await asyncio.to_thread(store.routing_states)
        self.apply_routing(states)
        defs = await asyncio.to_thread(store.defs)
        for name, d in defs.items():
            if name in {t.name for t in self.gw.config.trials}:
                continue
            try:
                t = TrialConfig.model_validate(d)
                if self.trials.get(name) != t:
                    self.add_trial(t)
            except ValueError as e:
                log.error("trial %s from the database is invalid, ignored: %s", name, e)
        for name in [n for n in self.trials if n not in defs and n not in {t.name for t in self.gw.config.trials}]:
            self.remove_trial(name)
        # other replicas spend too: the ledger in the database is the floor of what this one knows
        for name in list(self.trials):
            db = await asyncio.to_thread(store.spent, name)
            self.spent[name] = max(self.spent.get(name, 0.0), db)

    async def flush(self) -> None:
        """Feed the guards the results since the last flush, then write the queued results and
        spend (the background loop, shutdown, tests)."""
        rows = list(self._to_watch)
        self._to_watch.clear()
        if self.watches and rows:
            try:
                await self._watch(rows)
            except Exception:
                log.exception("trials: the guard could not act on %d result(s); will look again at the next ones", len(rows))
        await self._rows.flush()
        await self._spend.flush()

    def _add_row(self, row: dict[str, Any]) -> None:
        self._rows.put(row)
        if self.watches:
            self._to_watch.append(row)

    def _write_results(self, rows: list[dict[str, Any]]) -> None:
        if self.store is not None:
            self.store.add_results(rows)

    def _write_spend(self, rows: list[dict[str, Any]]) -> None:
        if self.store is not None:
            self.store.add_spend_rows(rows)

    # -- hot path -------------------------------------------------------------------------------
    def _participates(self, t: TrialConfig, ctx: RequestContext) -> bool:
        p = ctx.principal
        if t.keys is not None and p.key_id not in t.keys:
            return False
        return not (t.teams is not None and p.team_id not in t.teams)

    def _may_use(self, ctx: RequestContext, model: str) -> bool:
        if not ctx.principal.may_use(model):
            return False
        return bool(allowed(self.gw.providers.get(model, ()), request_policy(ctx)))

    def exhausted(self, t: TrialConfig) -> bool:
        if self._spend.full:
            return True  # spend cannot be recorded (database down): no new trial calls
        return t.budget_usd is not None and self.spent.get(t.name, 0.0) >= t.budget_usd

    def targets(self, model: str) -> list[str]:
        """Models ``pre_route`` may send a request for ``model`` to (budgets reserve over them)."""
        out = []
        st = self.overrides.get(model)
        if st is not None:
            out.append(st.candidate)
        for t in self.by_incumbent.get(model, ()):
            if t.mode == "canary" and t.candidates:
                out.append(t.candidates[0])
        return out

    def pre_route(self, ctx: RequestContext) -> None:
        replay = ctx.headers.get(REPLAY_HEADER) if ctx.headers is not None else None
        if replay:  # an offline replay: not live traffic, never split or mirrored
            ctx.trial = REPLAY_PREFIX + str(replay)[:100]
            return
        model = ctx.model or ""
        st = self.overrides.get(model)
        if st is not None:
            share = st.share()
            if share > 0 and sticky_unit(ctx, st.trial) < share and self._may_use(ctx, st.candidate):
                ctx.trial_promoted = st.trial
                ctx.model = st.candidate
                if st.trial in self.watches:  # guarded: the promoted answers are watched like a canary arm
                    self._arm(ctx, self.trials[st.trial], shadow_ok=(ctx.dialect, ctx.endpoint) in CAPTURED)
                return
        trials = self.by_incumbent.get(model)
        if not trials or ctx.endpoint not in ("chat", "messages", "responses"):
            return
        # the answer the client got is captured on the OpenAI chat, Anthropic Messages and Responses paths
        shadow_ok = (ctx.dialect, ctx.endpoint) in CAPTURED
        for t in trials:
            if not self._participates(t, ctx):
                continue
            if t.mode == "canary":
                if t.name in self.halted:  # rolled back: the candidate answers no one
                    continue
                ctx.trial = t.name
                cand = t.candidates[0]
                if sticky_unit(ctx, t.name, t.sticky) < t.sample_rate and self._may_use(ctx, cand):
                    ctx.model = cand
                    self._arm(ctx, t, shadow_ok)
                    return  # answered by the candidate: nothing left to shadow
                ctx.trial_arm = "incumbent"
                continue
            if shadow_ok and not self.exhausted(t) and self.rng.random() < t.sample_rate:
                if t.name in ctx.trial_shadow:  # the hook ran twice for this request
                    continue
                ctx.trial_shadow = (*ctx.trial_shadow, t.name)
                ctx.capture_response = True
                ctx.trial = ctx.trial or t.name

    def _arm(self, ctx: RequestContext, t: TrialConfig, shadow_ok: bool) -> None:
        """Mark a request the candidate answers (canary arm, or a guarded promotion) for a row,
        and a sampled share of them for judging against a background incumbent call."""
        ctx.trial = t.name
        ctx.trial_arm = "candidate"
        if shadow_ok and t.judge is not None and not self.exhausted(t) and self.rng.random() < t.canary_judge_rate:
            ctx.trial_canary_judge = True  # judged against a background incumbent call
            ctx.capture_response = True

    def on_complete(self, ctx: RequestContext) -> None:
        if ctx.trial_arm is not None:
            self._canary_row(ctx)
        names = ctx.trial_shadow
        if not names or ctx.status != 200 or ctx.error is not None or ctx.cancelled:
            return
        snapshot = self._snapshot(ctx) if ctx.response_body else None
        if snapshot is None:  # no answer captured, or a request that cannot be replayed
            why = "not_replayable" if ctx.response_body else "no_incumbent_answer"
            for name in names:
                self.counters.setdefault(name, Counter())[why] += 1
            return
        for name in names:
            t = self.trials.get(name)
            if t is not None:
                self._spawn(t, self._background(t, self._shadow_one(t, snapshot)))

    @staticmethod
    def _snapshot(ctx: RequestContext) -> dict[str, Any] | None:
        return snapshot(ctx, FORWARDED_HEADERS)

    def _spawn(self, t: TrialConfig, coro: Any) -> bool:
        """Schedule one background evaluation; False (counted, coroutine closed) when the queue is full."""
        if self.pending[t.name] >= t.max_concurrency * QUEUE_FACTOR:
            self.counters[t.name]["dropped_queue_full"] += 1
            coro.close()
            return False
        self.pending[t.name] += 1
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    def _canary_row(self, ctx: RequestContext) -> None:
        t = self.trials.get(ctx.trial or "")
        if t is None:
            return
        arm = ctx.trial_arm
        pt, ct = ctx.usage.prompt_tokens, ctx.usage.completion_tokens
        cost = ctx.cost_usd if ctx.cost_usd is not None else price_of(ctx.model or "", t, self.gw.config, pt, ct)
        ms = ctx.elapsed() * 1000
        err = ctx.error if ctx.status >= 400 or ctx.error else None
        side = "candidate" if arm == "candidate" else "incumbent"
        promoted = ctx.trial_promoted is not None
        row = {"id": "tr_" + os.urandom(10).hex(), "trial": t.name, "ts": time.time(),
               "source": "promoted" if promoted else "canary", "item": ctx.request_id,
               "candidate": (ctx.model or t.candidates[0]) if promoted else t.candidates[0], "request": None,
               "incumbent_answer": None, "candidate_answer": None, "incumbent_ms": None, "candidate_ms": None,
               "incumbent_cost": None, "candidate_cost": None, "incumbent_error": None, "candidate_error": None,
               "judge_score": None, "judge_status": None, "judge_detail": None, "scores": None}
        row[f"{side}_ms"], row[f"{side}_cost"], row[f"{side}_error"] = ms, cost, err
        self.counters[t.name][f"canary_{side}"] += 1
        if arm == "candidate" and cost:
            self._charge(t, "candidate", ctx.model or "", cost)
        if (arm == "candidate" and ctx.trial_canary_judge and err is None and ctx.status == 200
                and not ctx.cancelled):
            snap = self._snapshot(ctx) if ctx.response_body else None
            if snap is None:
                self.counters[t.name]["canary_no_answer"] += 1
            elif self._spawn(t, self._background(t, self._canary_judge(t, row, snap))):
                return  # the background task adds the row, with the judge's score
        self._add_row(row)

    # -- background ------------------------------------------------------------------------------
    def _charge(self, t: TrialConfig, kind: str, model: str, cost: float | None) -> None:
        if cost:
            self.spent[t.name] = self.spent.get(t.name, 0.0) + cost
            self._spend.put({"trial": t.name, "ts": time.time(), "kind": kind, "model": model, "cost_usd": cost})

    async def call_model(self, model: str, body: dict[str, Any], policy: str | None, dialect: str = "openai",
                         headers: dict[str, str] | None = None, canonical: c.Request | None = None) -> CallOutcome:
        """One non-streaming call to ``model`` through the gateway's own executor (strategy order,
        breakers, deadlines, retry classification), flagged as a background call: only deployments
        ``policy`` allows, no fallback to another model, no client and no caller's budget. ``body``
        is an OpenAI chat request, or an Anthropic Messages request when ``dialect`` is "anthropic";
        it goes as is (with ``headers``) to a deployment of the same protocol, through the canonical
        form to any other. A ``canonical`` request (/v1/responses) goes to every protocol as the
        Responses handler translates it."""
        if not allowed(self.gw.providers.get(model, ()), policy):  # an invalid policy allows nothing
            return CallOutcome(error=f"no deployment of {model!r} is allowed by data policy {policy!r}")
        endpoint = "messages" if dialect == "anthropic" else "chat"
        ctx = RequestContext("trial_" + os.urandom(8).hex(), "anthropic" if dialect == "anthropic" else "openai",
                             endpoint, model=model, background=True,
                             principal=Principal(policy=policy))
        canon: list[Any] = []

        def build(p: Provider) -> UpstreamCall:
            if canonical is not None:
                return translate.upstream_call(p, replace(canonical, stream=False))
            if p.protocol == dialect:  # same protocol: the request as the client sent it
                return UpstreamCall(endpoint, {**body, "model": p.deployment.model}, False, headers=dict(headers or {}))
            if dialect == "openai":  # an Anthropic / Gemini deployment: translate like the OpenAI handler does
                return translate.openai_call(p, "chat", body, canon)
            if not canon:  # an Anthropic request to another protocol: as the Messages handler does
                canon.append(anth.request_to_canonical(body))
            return translate.upstream_call(p, canon[0])

        t0 = time.perf_counter()
        try:
            p, reply = await self.gw.execute(ctx, build)
            if p.protocol == "openai":
                obj = reply.parsed if reply.parsed is not None else orjson.loads(reply.body or b"{}")
            else:
                r = translate.reply_to_canonical(p.protocol, reply.body or b"", ctx, reply.parsed)
                obj = oc.response_from_canonical(r, model)
            pt, ct = usage_tokens(obj)
            return CallOutcome(answer_from_json(obj), (time.perf_counter() - t0) * 1000, None, None, pt, ct,
                               deployment=p.deployment)
        except GatewayError as e:
            return CallOutcome(ms=(time.perf_counter() - t0) * 1000, error=e.message)
        except Exception as e:
            return CallOutcome(ms=(time.perf_counter() - t0) * 1000, error=f"{type(e).__name__}: {e}")
        finally:
            await close_upstream(ctx)

    async def _background(self, t: TrialConfig, work: Any) -> None:
        """Run one background evaluation within the trial's concurrency bound; errors are counted."""
        try:
            async with self.sems[t.name]:
                await work
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("trial %s: background evaluation failed", t.name)
            self.counters[t.name]["internal_errors"] += 1
        finally:
            self.pending[t.name] -= 1

    def _judge_call(self, t: TrialConfig, policy: str | None) -> Any:
        """The judge as a JudgeCall: on deployments ``policy`` allows, priced into the trial's spend."""

        async def judge_call(messages: list[dict[str, Any]]) -> str:
            assert t.judge is not None
            o = await self.call_model(t.judge.model, {"messages": messages, "max_tokens": t.judge.max_tokens,
                                                      "temperature": t.judge.temperature}, policy)
            self._charge(t, "judge", t.judge.model,
                         price_of(t.judge.model, t, self.gw.config, o.prompt_tokens, o.completion_tokens, o.deployment))
            if o.answer is None:
                raise RuntimeError(o.error or "judge call failed")
            return o.answer.text

        return judge_call

    def _judge_skip(self, t: TrialConfig, policy: str | None) -> str | None:
        if t.judge is None:
            return None
        if not allowed(self.gw.providers.get(t.judge.model, ()), policy):
            return "skipped_policy"
        return "skipped_budget" if self.exhausted(t) else None

    async def _shadow_one(self, t: TrialConfig, snap: dict[str, Any]) -> None:
        c = self.counters[t.name]
        policy, dialect = snap["policy"], snap["dialect"]
        pt, ct = snap["usage"]
        inc = CallOutcome(answer_of(dialect, snap["response"]), snap["ms"], None, None, pt, ct)
        inc.cost = snap["cost"] if snap["cost"] is not None else price_of(t.incumbent, t, self.gw.config, pt, ct)
        body = snap["body"]
        for cand_name in t.candidates:
            if self.exhausted(t):
                c["skipped_budget"] += 1
                return
            if not allowed(self.gw.providers.get(cand_name, ()), policy):
                c["skipped_policy"] += 1
                continue
            cand = await self.call_model(cand_name, body, policy, dialect, snap["headers"], snap["canonical"])
            cand.cost = price_of(cand_name, t, self.gw.config, cand.prompt_tokens, cand.completion_tokens, cand.deployment)
            self._charge(t, "candidate", cand_name, cand.cost)
            c["candidate_failures" if cand.answer is None else "candidate_calls"] += 1
            row, jr = await evaluate(t, source="shadow", item_id=snap["request_id"], request=judge_request(dialect, body),
                                     meta={}, candidate=cand_name, inc=inc, cand=cand, scorers=self.scorers.get(t.name, {}),
                                     judge=self._judge_call(t, policy) if t.judge is not None else None,
                                     judge_skip=self._judge_skip(t, policy))
            if jr is not None and jr.status == "unparsable":
                c["judge_unparsable"] += 1
            c["results"] += 1
            self._add_row(row)

    async def _canary_judge(self, t: TrialConfig, row: dict[str, Any], snap: dict[str, Any]) -> None:
        """Judge a candidate-arm canary answer against the incumbent's answer to the same request,
        asked in the background (policy-respecting, priced into the trial's spend). The arm's own
        latency and cost in ``row`` stay the live request's; the background call only adds a score."""
        c = self.counters[t.name]
        try:
            policy, dialect = snap["policy"], snap["dialect"]
            if self.exhausted(t):
                row["judge_status"] = "skipped_budget"
                return
            if not allowed(self.gw.providers.get(t.incumbent, ()), policy):
                row["judge_status"] = "skipped_policy"
                c["canary_judge_skipped_policy"] += 1
                return
            inc = await self.call_model(t.incumbent, snap["body"], policy, dialect, snap["headers"], snap["canonical"])
            self._charge(t, "incumbent", t.incumbent,
                         price_of(t.incumbent, t, self.gw.config, inc.prompt_tokens, inc.completion_tokens, inc.deployment))
            if inc.answer is None:  # our reference call failed: not the candidate's loss, so not scored
                row["judge_status"] = "incumbent_call_failed"
                row["judge_detail"] = orjson.dumps({"error": (inc.error or "")[:2000]}).decode()
                c["canary_judge_incumbent_failed"] += 1
                return
            pt, ct = snap["usage"]
            cand = CallOutcome(answer_of(dialect, snap["response"]), snap["ms"], None, None, pt, ct)
            judged, jr = await evaluate(t, source="canary", item_id=snap["request_id"],
                                        request=judge_request(dialect, snap["body"]), meta={}, candidate=row["candidate"],
                                        inc=inc, cand=cand, scorers=self.scorers.get(t.name, {}),
                                        judge=self._judge_call(t, policy), judge_skip=self._judge_skip(t, policy))
            for k in ("request", "incumbent_answer", "candidate_answer", "judge_score", "judge_status", "judge_detail", "scores"):
                row[k] = judged[k]
            if jr is not None and jr.status == "unparsable":
                c["judge_unparsable"] += 1
            c["canary_judged"] += 1
        finally:
            self._add_row(row)

    def status(self) -> list[dict[str, Any]]:
        out = []
        for t in self.trials.values():
            st = next((s for s in self.overrides.values() if s.trial == t.name), None)
            out.append({"name": t.name, "mode": t.mode, "incumbent": t.incumbent, "candidates": t.candidates,
                        "sample_rate": t.sample_rate, "enabled": t.enabled, "spent_usd": self.spent.get(t.name, 0.0),
                        "budget_usd": t.budget_usd, "exhausted": self.exhausted(t), "in_flight": self.pending[t.name],
                        "counters": dict(self.counters.get(t.name, {})),
                        "promoted_share": st.share() if st else 0.0,
                        "halted": t.name in self.halted,
                        "guard": self.watches[t.name].status() if t.name in self.watches else None,
                        "source": "config" if any(c.name == t.name for c in self.gw.config.trials) else "admin"})
        return out
