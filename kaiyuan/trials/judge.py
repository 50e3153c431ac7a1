"""Pairwise LLM-as-judge, both orders to cancel position bias, ties allowed.

A judge output whose verdict cannot be read is never guessed at: the pair is marked
``unparsable``, counted and shown in reports, and left out of the judge statistics.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from kaiyuan.trials.models import JudgeSettings

# Sends chat messages to the judge model; returns its text (raises on failure).
JudgeCall = Callable[[list[dict[str, Any]]], Awaitable[str]]

_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"\{(question|answer_a|answer_b)\}")


def quote(text: str, name: str) -> str:
    """``text`` between two marker lines carrying a tag derived from the content and not found
    in it, so an answer cannot end its own quotation and pose as the judge's instructions."""
    salt = 0
    while True:
        tag = hashlib.blake2b(f"{salt}\0{text}".encode(), digest_size=6).hexdigest()
        if tag not in text:
            return f"<<<{name} {tag}\n{text}\n{name} {tag}>>>"
        salt += 1


def fill_prompt(template: str, question: str, answer_a: str, answer_b: str) -> str:
    """The judge prompt with every placeholder filled in ONE pass over the template: text that
    comes from the request or an answer is never scanned for placeholders (a request that says
    ``{answer_b}`` stays as written), and each input is quoted."""
    values = {"question": quote(question, "REQUEST"), "answer_a": quote(answer_a, "ANSWER A"),
              "answer_b": quote(answer_b, "ANSWER B")}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'C' (tie) from the judge's text; None unless exactly one distinct verdict is given."""
    found = {m.upper() for m in _VERDICT.findall(text or "")}
    return found.pop() if len(found) == 1 else None


@dataclass
class JudgeResult:
    status: str  # "ok" | "unparsable" | "error"
    score: float | None  # candidate's score in [0, 1]: 1 better, 0.5 tie, 0 worse
    raw: list[str] = field(default_factory=list)
    verdicts: list[str | None] = field(default_factory=list)
    error: str | None = None

    def detail(self) -> dict[str, Any]:
        return {"raw": [r[-2000:] for r in self.raw], "verdicts": self.verdicts, "error": self.error}


def _question(request: dict[str, Any]) -> str:
    msgs = request.get("messages")
    if isinstance(msgs, list):
        parts = []
        for m in msgs:
            if not isinstance(m, dict):
                continue
            c = m.get("content")
            if isinstance(c, list):
                c = " ".join(p.get("text", "") for p in c if isinstance(p, dict))
            parts.append(f"{m.get('role', 'user')}: {c or ''}")
        return "\n".join(parts)
    return str(request.get("prompt", ""))


async def judge_pair(settings: JudgeSettings, call: JudgeCall, request: dict[str, Any], incumbent: str, candidate: str) -> JudgeResult:
    """Judge (incumbent, candidate) and, with ``both_orders``, (candidate, incumbent); average."""
    q = _question(request)
    orders = [(incumbent, candidate, "B")]
    if settings.both_orders:
        orders.append((candidate, incumbent, "A"))
    res = JudgeResult("ok", None)
    scores: list[float] = []
    for a, b, cand_letter in orders:
        prompt = fill_prompt(settings.prompt, q, a, b)
        try:
            text = await call([{"role": "user", "content": prompt}])
        except Exception as e:
            res.status, res.error = "error", f"{type(e).__name__}: {e}"
            return res
        res.raw.append(text)
        v = parse_verdict(text)
        res.verdicts.append(v)
        if v is None:
            res.status = "unparsable"
            continue
        scores.append(0.5 if v == "C" else (1.0 if v == cand_letter else 0.0))
    if res.status == "ok":
        res.score = sum(scores) / len(scores)
    return res
