"""A fake OpenAI-compatible upstream that answers arithmetic questions correctly at known rates,
and a fake judge, so trial statistics can be checked against a known truth.

- ``What is A + B?`` sent to upstream model M is answered ``The answer is A+B.`` for a fixed,
  deterministic subset of questions of size ``accuracy[M]`` (per question, by hash), else off by one.
- Model ``quiz-judge`` reads the pairwise judge prompt, checks both answers against the question,
  and answers ``[[A]]``, ``[[B]]`` or ``[[C]]``; with ``judge_garbage`` it answers without a verdict.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Any

import orjson
from aiohttp import web

from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI

_Q = re.compile(r"What is (-?\d+) \+ (-?\d+)\?")
_ANS = re.compile(r"The answer is (-?\d+)")


def quiz_items(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` dataset rows: ``{"id", "messages", "reference"}``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randrange(1000), rng.randrange(1000)
        out.append({"id": f"q{i}", "messages": [{"role": "user", "content": f"What is {a} + {b}?"}], "reference": str(a + b)})
    return out


def _u(seed: str) -> float:
    return int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big") / 2**64


class FakeQuiz(FakeOpenAI):
    def __init__(self, accuracy: dict[str, float], *, api_key: str | None = None, seed: int = 0) -> None:
        super().__init__(api_key=api_key, seed=seed)
        self.accuracy = accuracy
        self.quiz_seed = seed
        self.judge_garbage = False
        self.fail_models: set[str] = set()  # upstream models that answer 500

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            model = orjson.loads(await request.read()).get("model")
        except (orjson.JSONDecodeError, AttributeError):
            model = None
        if model in self.fail_models:
            await request.read()
            return self._error(500, "The server had an error while processing your request.")
        return await super().chat(request)

    def answer_for(self, model: str, question: str) -> str:
        m = _Q.search(question)
        if not m:
            return "I only do sums."
        right = int(m.group(1)) + int(m.group(2))
        ok = _u(f"{self.quiz_seed}:{model}:{question}") < self.accuracy.get(model, 1.0)
        return f"The answer is {right if ok else right + 1}."

    def _answer(self, body: dict[str, Any], b: Behaviour) -> dict[str, Any]:
        ans = super()._answer(body, b)
        if ans["tool_calls"] or b.content is not None:
            return ans
        model = str(body.get("model", ""))
        text = ans["user"]
        if model == "quiz-judge":
            ans["content"] = self._judge(text)
        else:
            ans["content"] = self.answer_for(model, text)
        return ans

    def _judge(self, prompt: str) -> str:
        if self.judge_garbage:
            return "Both answers have merit; I cannot decide."
        q = _Q.search(prompt)
        parts = re.split(r"\[Answer [AB]\]", prompt)
        if not q or len(parts) < 3:
            return "No verdict possible."
        right = int(q.group(1)) + int(q.group(2))

        def ok(s: str) -> bool:
            m = _ANS.search(s)
            return bool(m and int(m.group(1)) == right)

        a, b = ok(parts[1]), ok(parts[2])
        return "Verdict: " + ("[[C]]" if a == b else "[[A]]" if a else "[[B]]")
