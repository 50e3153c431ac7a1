"""Scoring one answer against an item: reference checks and user plugins.

A scorer is ``f(answer, item) -> float | None``: a score in [0, 1], or ``None`` when it does not
apply (no reference for this item). ``answer`` is an :class:`Answer`; ``item`` is the dataset row
(``reference``, ``schema``, ``tool_call`` ...). User scorers are entry points in the group
``kaiyuan.scorers`` with the same signature.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol, cast

import orjson

from kaiyuan.trials import regex_match
from kaiyuan.trials.models import ScorerSpec

ENTRY_POINT_GROUP = "kaiyuan.scorers"


@dataclass
class Answer:
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # [{"name":..., "arguments": str}]
    steps: list[str] = field(default_factory=list)  # agent traces: the tool calls made before this final answer


Scorer = Callable[[Answer, dict[str, Any]], "float | None"]


# -- reading answers out of OpenAI responses ------------------------------------------------------


def answer_from_json(obj: Any) -> Answer:
    """The first choice of a chat completion (or a legacy completion) as an :class:`Answer`."""
    if not isinstance(obj, dict):
        return Answer()
    choices = obj.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return Answer()
    c = choices[0]
    if "text" in c and "message" not in c:
        return Answer(str(c.get("text") or ""))
    msg = c.get("message") or {}
    calls = []
    for tc in msg.get("tool_calls") or []:
        fn = (tc or {}).get("function") or {}
        calls.append({"name": fn.get("name"), "arguments": fn.get("arguments") or ""})
    content = msg.get("content")
    return Answer(content if isinstance(content, str) else "", calls)


def answer_from_sse(data: bytes) -> Answer:
    """Reassemble the first choice of an OpenAI SSE stream (content deltas and tool-call deltas)."""
    text: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    for line in data.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            break
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        for ch in (obj.get("choices") or []) if isinstance(obj, dict) else []:
            if ch.get("index", 0) != 0:
                continue
            if "text" in ch:
                text.append(ch.get("text") or "")
            delta = ch.get("delta") or {}
            if isinstance(delta.get("content"), str):
                text.append(delta["content"])
            for tc in delta.get("tool_calls") or []:
                slot = calls.setdefault(tc.get("index", 0), {"name": None, "arguments": ""})
                fn = tc.get("function") or {}
                if fn.get("name"):
                    slot["name"] = fn["name"]
                slot["arguments"] += fn.get("arguments") or ""
    return Answer("".join(text), [calls[i] for i in sorted(calls)])


def answer_from_bytes(data: bytes | None) -> Answer:
    if not data:
        return Answer()
    head = data.lstrip()[:6]
    if head.startswith(b"data:") or head.startswith(b"event:"):
        return answer_from_sse(data)
    try:
        return answer_from_json(orjson.loads(data))
    except orjson.JSONDecodeError:
        return Answer()


# -- reference checks --------------------------------------------------------------------------


def normalise(s: str) -> str:
    s = unicodedata.normalize("NFKC", s).casefold()
    s = re.sub(r"[^\w\s]", " ", s)
    return " ".join(s.split())


_NUM = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")


def last_number(text: str) -> float | None:
    """The last number in ``text`` (``1,234.5`` understood), or None."""
    found = _NUM.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _ref(item: dict[str, Any]) -> Any:
    return item.get("reference")


def exact(answer: Answer, item: dict[str, Any]) -> float | None:
    ref = _ref(item)
    return None if ref is None else float(answer.text.strip() == str(ref).strip())


def normalized(answer: Answer, item: dict[str, Any]) -> float | None:
    ref = _ref(item)
    return None if ref is None else float(normalise(answer.text) == normalise(str(ref)))


def numeric(answer: Answer, item: dict[str, Any], tolerance: float = 1e-6) -> float | None:
    ref = _ref(item)
    if ref is None:
        return None
    want = ref if isinstance(ref, int | float) else last_number(str(ref))
    if want is None:
        return None
    got = last_number(answer.text)
    return float(got is not None and abs(got - float(want)) <= tolerance)


def regex(answer: Answer, item: dict[str, Any], pattern: str | None = None,
          timeout_s: float = regex_match.DEFAULT_TIMEOUT_S) -> float | None:
    """1 when the pattern (the scorer's, else the item's ``pattern``, else its reference) matches
    the answer. Matched with a time limit: past it, :class:`MatchTimeout` (scored as a failure)."""
    pat = pattern or item.get("pattern") or _ref(item)
    if pat is None:
        return None
    return float(regex_match.search(str(pat), answer.text, timeout_s))


def tool_call(answer: Answer, item: dict[str, Any]) -> float | None:
    """Item ``tool_call: {"name": ..., "arguments": {...}}``: the first call must match; arguments
    compared as JSON (only the keys the reference names)."""
    want = item.get("tool_call")
    if not isinstance(want, dict):
        return None
    if not answer.tool_calls:
        return 0.0
    got = answer.tool_calls[0]
    if got.get("name") != want.get("name"):
        return 0.0
    want_args = want.get("arguments")
    if want_args is None:
        return 1.0
    try:
        args = orjson.loads(got.get("arguments") or "{}")
    except orjson.JSONDecodeError:
        return 0.0
    if isinstance(want_args, dict) and isinstance(args, dict):
        return float(all(args.get(k) == v for k, v in want_args.items()))
    return float(args == want_args)


def load_plugin(name: str) -> Scorer:
    eps = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not eps:
        known = ", ".join(sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))) or "(none installed)"
        raise ValueError(f"no scorer plugin {name!r} in entry point group {ENTRY_POINT_GROUP}; installed: {known}")
    fn = eps[0].load()
    if not callable(fn):
        raise ValueError(f"scorer plugin {name!r} is not callable")
    return fn


class PairScorer(Protocol):
    """A scorer that needs both answers (agreement with the incumbent). It is also a plain
    :data:`Scorer` (alone it does not apply: None); :func:`score_pair` calls ``pair`` instead."""

    pairwise: bool

    def __call__(self, answer: Answer, item: dict[str, Any]) -> float | None: ...

    def pair(self, inc: Answer | None, cand: Answer | None, item: dict[str, Any]) -> dict[str, float | None]: ...


def build_scorer(spec: ScorerSpec) -> Scorer:
    t = spec.type
    if t == "exact":
        return exact
    if t == "normalized":
        return normalized
    if t == "numeric":
        return lambda a, i: numeric(a, i, spec.tolerance)
    if t == "regex":
        return lambda a, i: regex(a, i, spec.pattern, spec.timeout_s)
    if t in ("json_schema", "tool_schema", "tool_agreement"):
        from kaiyuan.trials import tool_scorers

        return tool_scorers.build(t, spec.json_schema)
    if t == "tool_call":
        return tool_call
    assert spec.plugin is not None
    return load_plugin(spec.plugin)


def score_pair(scorers: dict[str, Scorer], inc: Answer | None, cand: Answer | None, item: dict[str, Any]) -> dict[str, Any]:
    """Every scorer on both answers: ``{label: {"incumbent": x, "candidate": y}}``. A failed call
    scores 0 (a failure is a wrong answer, not a missing one); a scorer that raises is reported, and
    one that ran out of time (a regex past its limit) also scores 0, with the reason in ``errors``.
    Runs off the event loop (:func:`kaiyuan.trials.evaluate.score_off_loop`)."""
    out: dict[str, Any] = {}
    for label, fn in scorers.items():
        entry: dict[str, Any] = {}
        if getattr(fn, "pairwise", False):
            pair_fn = cast(PairScorer, fn)
            try:
                entry.update(pair_fn.pair(inc, cand, item))
            except Exception as e:
                entry = {"incumbent": None, "candidate": None, "errors": [f"{type(e).__name__}: {e}"]}
            out[label] = entry
            continue
        for side, ans in (("incumbent", inc), ("candidate", cand)):
            try:
                if ans is None:
                    probe = fn(Answer(), item)
                    entry[side] = None if probe is None else 0.0
                else:
                    v = fn(ans, item)
                    entry[side] = None if v is None else min(1.0, max(0.0, float(v)))
            except regex_match.MatchTimeout as e:
                entry[side] = 0.0
                entry.setdefault("errors", []).append(f"{side}: timed out: {e}")
            except Exception as e:
                entry[side] = None
                entry.setdefault("errors", []).append(f"{side}: {type(e).__name__}: {e}")
        out[label] = entry
    return out
