"""One trial observation: the incumbent's and a candidate's outcome on the same request, scored.

Shared by the offline runner (calls through the gateway's HTTP API) and shadow mode (calls inside
the gateway). Produces one ``trial_result`` row.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson

from kaiyuan.accounting.prices import PriceCatalog, deployment_price
from kaiyuan.config import ConfigError, DeploymentBase, GatewayConfig
from kaiyuan.context import Usage
from kaiyuan.trials.judge import JudgeCall, JudgeResult, judge_pair
from kaiyuan.trials.models import TrialConfig
from kaiyuan.trials.scorers import Answer, Scorer, build_scorer, score_pair


@dataclass
class CallOutcome:
    answer: Answer | None = None  # None when the call failed
    ms: float | None = None
    cost: float | None = None
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    request_id: str | None = None  # the gateway's x-kaiyuan-request-id (offline replays)
    deployment: DeploymentBase | None = None  # the deployment that answered (calls inside the gateway)


log = logging.getLogger("kaiyuan.trials")
_CATALOGS: dict[tuple[str | None, float], PriceCatalog | None] = {}


def catalog_for(config: GatewayConfig | None) -> PriceCatalog | None:
    """The gateway's price catalog (bundled + ``accounting.prices_file``), loaded once per setting."""
    if config is None:
        return None
    key = (config.accounting.prices_file, config.accounting.cny_per_usd)
    if key not in _CATALOGS:
        try:
            _CATALOGS[key] = PriceCatalog.load(config.accounting)
        except ConfigError as e:
            log.error("trials: price catalog unavailable, pricing from trial prices only: %s", e)
            _CATALOGS[key] = None
    return _CATALOGS[key]


def usage_tokens(obj: Any) -> tuple[int | None, int | None]:
    u = obj.get("usage") if isinstance(obj, dict) else None
    if not isinstance(u, dict):
        return None, None
    return u.get("prompt_tokens"), u.get("completion_tokens")


def price_of(model: str, trial: TrialConfig, config: GatewayConfig | None, pt: int | None, ct: int | None,
             dep: DeploymentBase | None = None) -> float | None:
    """USD for one call: the trial's own ``prices``, else the deployment's price as the gateway's
    accounting resolves it (its config ``price``, else the price catalog by upstream model id, CNY
    converted). ``dep`` is the deployment that answered; default the model's first. ``None`` when unknown."""
    if pt is None and ct is None:
        return None
    p = trial.prices.get(model)
    if p is not None:
        return ((pt or 0) * p.input_per_mtok + (ct or 0) * p.output_per_mtok) / 1e6
    if dep is None:
        m = config.model(model) if config is not None else None
        if m is None or not m.deployments:
            return None
        dep = m.deployments[0]
    catalog = catalog_for(config)
    if catalog is None:
        return None
    resolved = deployment_price(dep, catalog)
    return resolved.cost(Usage(prompt_tokens=pt, completion_tokens=ct)) if resolved is not None else None


def has_price(model: str, trial: TrialConfig, config: GatewayConfig | None) -> bool:
    """Whether ``price_of`` can price calls to ``model`` (on its first deployment)."""
    return price_of(model, trial, config, 1, 1) is not None


def build_scorers(trial: TrialConfig) -> dict[str, Scorer]:
    return {s.label: build_scorer(s) for s in trial.scorers}


SCORING_THREADS = 2  # scorers run here, never on the event loop (a regex has a time limit besides)
SCORING_WAIT_S = 60.0  # one pair's scoring is waited for this long at most (a plugin that hangs)
_scoring: list[ThreadPoolExecutor] = []


async def score_off_loop(scorers: dict[str, Scorer], inc: Answer | None, cand: Answer | None,
                         item: dict[str, Any]) -> dict[str, Any]:
    """:func:`score_pair` in a small thread pool: a slow scorer (a user's plugin, a regex near its
    time limit, a big JSON schema) never holds the event loop. The pool's queue is bounded by the
    trials' own concurrency (``max_concurrency`` x ``QUEUE_FACTOR`` background tasks per trial).
    Scoring that takes longer than ``SCORING_WAIT_S`` (only a plugin can: a regex stops at its
    limit) is given up: every scorer of the pair reports the error and the row is written without
    scores. The thread itself cannot be stopped; it frees its pool slot when the plugin returns."""
    if not _scoring:
        _scoring.append(ThreadPoolExecutor(SCORING_THREADS, thread_name_prefix="kaiyuan-scoring"))
    job = asyncio.get_running_loop().run_in_executor(_scoring[0], score_pair, scorers, inc, cand, item)
    try:
        return await asyncio.wait_for(job, SCORING_WAIT_S)
    except TimeoutError:
        log.error("trials: scoring one pair took over %gs (a plugin scorer that hangs?); scored nothing", SCORING_WAIT_S)
        err = f"scoring did not finish within {SCORING_WAIT_S:g}s (a plugin scorer that hangs?); not scored"
        return {label: {"incumbent": None, "candidate": None, "errors": [err]} for label in scorers}


def _text(a: Answer) -> str:
    steps = "".join(f"[step {i}] {s}\n" for i, s in enumerate(a.steps, start=1))
    if a.tool_calls:
        calls = "; ".join(f"{c.get('name')}({c.get('arguments')})" for c in a.tool_calls)
        return steps + (a.text + "\n" if a.text else "") + f"[tool calls] {calls}"
    return steps + a.text


async def evaluate(
    trial: TrialConfig,
    *,
    source: str,
    item_id: str,
    request: dict[str, Any],
    meta: dict[str, Any],
    candidate: str,
    inc: CallOutcome,
    cand: CallOutcome,
    scorers: dict[str, Scorer],
    judge: JudgeCall | None,
    judge_skip: str | None = None,
) -> tuple[dict[str, Any], JudgeResult | None]:
    """Score one pair and return the ``trial_result`` row (and the judge result, for spend)."""
    scores = await score_off_loop(scorers, inc.answer, cand.answer, {**meta, "request": request}) if scorers else {}
    jr: JudgeResult | None = None
    judge_score: float | None = None
    judge_status: str | None = None
    detail: dict[str, Any] | None = None
    if trial.judge is not None:
        if inc.answer is not None and cand.answer is None:
            judge_status, judge_score = "candidate_failed", 0.0
        elif inc.answer is None and cand.answer is not None:
            judge_status, judge_score = "incumbent_failed", 1.0
        elif inc.answer is None:
            judge_status = "both_failed"
        elif judge_skip is not None or judge is None:
            judge_status = judge_skip or "skipped"
        else:
            assert cand.answer is not None
            jr = await judge_pair(trial.judge, judge, request, _text(inc.answer), _text(cand.answer))
            judge_status, judge_score, detail = jr.status, jr.score, jr.detail()
    row = {
        "id": "tr_" + os.urandom(10).hex(),
        "trial": trial.name,
        "ts": time.time(),
        "source": source,
        "item": item_id[:200],
        "candidate": candidate,
        "request": orjson.dumps(request).decode()[:20000],
        "incumbent_answer": _text(inc.answer)[:20000] if inc.answer is not None else None,
        "candidate_answer": _text(cand.answer)[:20000] if cand.answer is not None else None,
        "incumbent_ms": inc.ms,
        "candidate_ms": cand.ms,
        "incumbent_cost": inc.cost,
        "candidate_cost": cand.cost,
        "incumbent_error": inc.error,
        "candidate_error": cand.error,
        "judge_score": judge_score,
        "judge_status": judge_status,
        "judge_detail": orjson.dumps(detail).decode() if detail else None,
        "scores": orjson.dumps(scores).decode() if scores else None,
    }
    return row, jr
