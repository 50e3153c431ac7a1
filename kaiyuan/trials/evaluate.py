"""One trial observation: the incumbent's and a candidate's outcome on the same request, scored.

Shared by the offline runner (calls through the gateway's HTTP API) and shadow mode (calls inside
the gateway). Produces one ``trial_result`` row.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import orjson

from kaiyuan.config import GatewayConfig
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


def usage_tokens(obj: Any) -> tuple[int | None, int | None]:
    u = obj.get("usage") if isinstance(obj, dict) else None
    if not isinstance(u, dict):
        return None, None
    return u.get("prompt_tokens"), u.get("completion_tokens")


def price_of(model: str, trial: TrialConfig, config: GatewayConfig | None, pt: int | None, ct: int | None) -> float | None:
    """USD for one call: the trial's own ``prices``, else the model's first deployment ``price``
    (``{input, output}`` per 1M tokens, USD only); ``None`` when unknown."""
    if pt is None and ct is None:
        return None
    p = trial.prices.get(model)
    if p is not None:
        return ((pt or 0) * p.input_per_mtok + (ct or 0) * p.output_per_mtok) / 1e6
    m = config.model(model) if config is not None else None
    if m is not None:
        price = m.deployments[0].price or {}
        if str(price.get("currency", "USD")).upper() != "USD":
            return None
        try:
            return ((pt or 0) * float(price["input"]) + (ct or 0) * float(price["output"])) / 1e6
        except (KeyError, TypeError, ValueError):
            return None
    return None


def build_scorers(trial: TrialConfig) -> dict[str, Scorer]:
    return {s.label: build_scorer(s) for s in trial.scorers}


def _text(a: Answer) -> str:
    if a.tool_calls:
        calls = "; ".join(f"{c.get('name')}({c.get('arguments')})" for c in a.tool_calls)
        return (a.text + "\n" if a.text else "") + f"[tool calls] {calls}"
    return a.text


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
    scores = score_pair(scorers, inc.answer, cand.answer, meta) if scorers else {}
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
