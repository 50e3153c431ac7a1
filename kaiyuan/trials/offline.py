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

from kaiyuan.config import GatewayConfig
from kaiyuan.trials.dataset import Item
from kaiyuan.trials.evaluate import CallOutcome, build_scorers, evaluate, price_of, usage_tokens
from kaiyuan.trials.models import TrialConfig
from kaiyuan.trials.policy import POLICY_HEADER, permits
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
    errors: list[str] = field(default_factory=list)


class GatewayClient:
    """Chat calls through the gateway's OpenAI API (so keys, policies and accounting apply)."""

    def __init__(self, base_url: str, api_key: str | None, timeout_s: float = 300) -> None:
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.headers = {"Content-Type": "application/json"}
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
                return CallOutcome(answer_from_json(obj), ms, None, None, pt, ct), obj
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


async def run_offline(
    trial: TrialConfig,
    items: list[Item],
    client: GatewayClient,
    store: TrialStore,
    config: GatewayConfig | None = None,
    concurrency: int | None = None,
) -> RunSummary:
    summary = RunSummary()
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
            calls = [client.chat(trial.incumbent, item.request, policy)] + [client.chat(c, item.request, policy) for c in cands]
            outs = await asyncio.gather(*calls)
            inc = outs[0][0]
            ledger: list[tuple[str, str, float]] = []
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
                await asyncio.to_thread(store.add_results, [row])
                summary.pairs += 1
            async with lock:
                if ledger:
                    await asyncio.to_thread(store.add_spend, trial.name, ledger)
                    spent += sum(x[2] for x in ledger)

    await asyncio.gather(*(one(it) for it in items))
    summary.spent_usd = spent
    return summary
