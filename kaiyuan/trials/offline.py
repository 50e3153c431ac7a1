"""Offline trials: replay a dataset through a running gateway to the incumbent and each candidate,
score the pairs, and store the results. Candidate and judge spend go to the trial's ledger and the
run stops when the trial's budget cap is reached.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from sqlalchemy import select, update

from kaiyuan.config import GatewayConfig
from kaiyuan.store.schema import request_log, trial_result
from kaiyuan.trials.agent import parse_trace, replay
from kaiyuan.trials.dataset import Item, replay_order
from kaiyuan.trials.evaluate import CallOutcome, build_scorers, evaluate, price_of, usage_tokens
from kaiyuan.trials.models import REPLAY_HEADER, TrialConfig
from kaiyuan.trials.policy import POLICY_HEADER, permits
from kaiyuan.trials.progress import Progress
from kaiyuan.trials.scorers import answer_from_json
from kaiyuan.trials.store import TrialStore

log = logging.getLogger("kaiyuan.trials")


@dataclass
class RunSummary:
    items: int = 0
    pairs: int = 0
    candidate_failures: int = 0
    incumbent_failures: int = 0
    judge_unparsable: int = 0
    stopped_by_budget: bool = False
    skipped_policy: int = 0
    spent_usd: float = 0.0
    backfilled: int = 0  # calls priced afterwards from the request log's cost_usd
    errors: list[str] = field(default_factory=list)


class GatewayClient:
    """Chat calls through the gateway's OpenAI API (so keys, policies and accounting apply)."""

    def __init__(self, base_url: str, api_key: str | None, timeout_s: float = 300, replay: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.headers = {"Content-Type": "application/json"}
        if replay:
            self.headers[REPLAY_HEADER] = replay
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> GatewayClient:
        self.session = aiohttp.ClientSession(timeout=self.timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    async def chat(self, model: str, request: dict[str, Any], policy: str | None = None) -> tuple[CallOutcome, Any]:
        assert self.session is not None
        headers = {**self.headers, POLICY_HEADER: policy} if policy else self.headers
        body = {k: v for k, v in request.items() if k not in ("stream", "stream_options")}
        body["model"] = model
        t0 = time.perf_counter()
        try:
            async with self.session.post(self.base_url + "/chat/completions", data=orjson.dumps(body), headers=headers) as r:
                data = await r.read()
                ms = (time.perf_counter() - t0) * 1000
                try:
                    obj = orjson.loads(data)
                except orjson.JSONDecodeError:
                    obj = None
                if r.status >= 400:
                    msg = (obj or {}).get("error", {}).get("message") if isinstance(obj, dict) else None
                    return CallOutcome(ms=ms, error=f"HTTP {r.status}: {msg or data[:200].decode('utf-8', 'replace')}"), obj
                pt, ct = usage_tokens(obj)
                rid = r.headers.get("x-kaiyuan-request-id")
                return CallOutcome(answer_from_json(obj), ms, None, None, pt, ct, rid), obj
        except (aiohttp.ClientError, TimeoutError) as e:
            return CallOutcome(ms=(time.perf_counter() - t0) * 1000, error=f"{type(e).__name__}: {e}"), None


def _policy_allows(config: GatewayConfig | None, model: str, policy: str | None) -> bool:
    """Whether some deployment of ``model`` may receive a request with ``policy`` (see trials.policy)."""
    if not policy:
        return True
    m = config.model(model) if config is not None else None
    if m is None:
        return False  # cannot check: fail closed
    return any(permits(policy, d.tags) for d in m.deployments)


async def _call(client: GatewayClient, model: str, item: Item, policy: str | None) -> tuple[CallOutcome, Any]:
    """One call, or, for an agent trace, the whole conversation (its final answer is scored)."""
    if "trace" not in item.meta:
        return await client.chat(model, item.request, policy)

    async def chat(request: dict[str, Any]) -> CallOutcome:
        return (await client.chat(model, request, policy))[0]

    return await replay(chat, item.request, parse_trace(item.meta["trace"])), None


async def run_offline(
    trial: TrialConfig,
    items: list[Item],
    client: GatewayClient,
    store: TrialStore,
    config: GatewayConfig | None = None,
    concurrency: int | None = None,
    backfill_wait_s: float = 5.0,
    progress: Progress | None = None,
) -> RunSummary:
    """Replay ``items`` (in the trial's seeded random order unless ``order: dataset``)."""
    if trial.order == "shuffled":
        items = replay_order(items, trial.seed)
    summary = RunSummary()
    unpriced: list[_Unpriced] = []
    scorers = build_scorers(trial)
    spent = store.spent(trial.name)
    cap = trial.budget_usd
    sem = asyncio.Semaphore(concurrency or trial.max_concurrency)
    lock = asyncio.Lock()

    def cost(model: str, o: CallOutcome) -> float | None:
        o.cost = price_of(model, trial, config, o.prompt_tokens, o.completion_tokens)
        return o.cost

    async def one(item: Item) -> None:
        nonlocal spent
        async with sem:
            if cap is not None and spent >= cap:
                summary.stopped_by_budget = True
                return
            summary.items += 1
            policy = item.meta.get("policy")
            cands = [c for c in trial.candidates if _policy_allows(config, c, policy)]
            summary.skipped_policy += len(trial.candidates) - len(cands)
            calls = [_call(client, m, item, policy) for m in (trial.incumbent, *cands)]
            outs = await asyncio.gather(*calls)
            inc = outs[0][0]
            ledger: list[tuple[str, str, float]] = []
            inc_fill = _Unpriced(inc.request_id, "incumbent", trial.incumbent, [])
            inc_cost = cost(trial.incumbent, inc)
            if inc_cost:
                ledger.append(("incumbent", trial.incumbent, inc_cost))  # a replay's incumbent call is trial spend too
            if inc.answer is None:
                summary.incumbent_failures += 1
            for cand_name, (cand, _obj) in zip(cands, outs[1:], strict=True):
                c = cost(cand_name, cand)
                if c:
                    ledger.append(("candidate", cand_name, c))
                if cand.answer is None:
                    summary.candidate_failures += 1
                judge_costs: list[float] = []

                async def judge_call(messages: list[dict[str, Any]], judge_costs: list[float] = judge_costs) -> str:
                    assert trial.judge is not None
                    req = {"messages": messages, "max_tokens": trial.judge.max_tokens, "temperature": trial.judge.temperature}
                    o, _ = await client.chat(trial.judge.model, req, policy)
                    jc = price_of(trial.judge.model, trial, config, o.prompt_tokens, o.completion_tokens)
                    if jc:
                        judge_costs.append(jc)
                    elif o.request_id:
                        unpriced.append(_Unpriced(o.request_id, "judge", trial.judge.model, []))
                    if o.answer is None:
                        raise RuntimeError(o.error or "judge call failed")
                    return o.answer.text

                skip: str | None = None
                if trial.judge is not None and not _policy_allows(config, trial.judge.model, policy):
                    skip = "skipped_policy"
                elif cap is not None and spent + sum(x[2] for x in ledger) >= cap:
                    skip = "skipped_budget"
                row, jr = await evaluate(trial, source="offline", item_id=item.id, request=item.request, meta=item.meta,
                                         candidate=cand_name, inc=inc, cand=cand, scorers=scorers,
                                         judge=judge_call if trial.judge else None, judge_skip=skip)
                if jr is not None and jr.status == "unparsable":
                    summary.judge_unparsable += 1
                ledger += [("judge", trial.judge.model, jc) for jc in judge_costs] if trial.judge else []
                if c is None and cand.request_id:
                    unpriced.append(_Unpriced(cand.request_id, "candidate", cand_name, [(row["id"], "candidate_cost")]))
                if inc_cost is None:
                    inc_fill.rows.append((row["id"], "incumbent_cost"))
                await asyncio.to_thread(store.add_results, [row])
                summary.pairs += 1
                if progress is not None:
                    progress.observe(row)
            if inc_cost is None and inc_fill.request_id:
                unpriced.append(inc_fill)
            async with lock:
                if ledger:
                    await asyncio.to_thread(store.add_spend, trial.name, ledger)
                    spent += sum(x[2] for x in ledger)
                if progress is not None:
                    progress.item_done(spent)

    try:
        await asyncio.gather(*(one(it) for it in items))
    finally:
        if progress is not None:
            progress.close()
    if unpriced and backfill_wait_s > 0:
        summary.backfilled, extra = await asyncio.to_thread(backfill_costs, store, trial.name, unpriced, backfill_wait_s)
        spent += extra
    summary.spent_usd = spent
    return summary


@dataclass
class _Unpriced:
    request_id: str | None
    kind: str  # incumbent | candidate | judge
    model: str
    rows: list[tuple[str, str]]  # (trial_result id, column) to fill


def backfill_costs(store: TrialStore, trial: str, unpriced: list[_Unpriced], wait_s: float) -> tuple[int, float]:
    """Price calls the trial had no price for from the request log's ``cost_usd`` (the gateway's
    price catalog), once the gateway has flushed its log. Returns (calls priced, USD added)."""
    want = {u.request_id: u for u in unpriced if u.request_id}
    found: dict[str, float] = {}
    deadline = time.monotonic() + wait_s
    t = request_log
    while want.keys() - found.keys():
        with store.engine.connect() as conn:
            q = select(t.c.id, t.c.cost_usd).where(t.c.id.in_(list(want.keys() - found.keys())), t.c.cost_usd.is_not(None))
            found.update({rid: float(c) for rid, c in conn.execute(q)})
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    ledger = []
    with store.engine.begin() as conn:
        for rid, cost in found.items():
            u = want[rid]
            for row_id, column in u.rows:
                conn.execute(update(trial_result).where(trial_result.c.id == row_id).values({column: cost}))
            ledger.append((u.kind, u.model, cost))
    store.add_spend(trial, ledger)
    return len(found), sum(c for _, _, c in ledger)
