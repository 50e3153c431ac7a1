"""Latency histograms with log-spaced buckets: mergeable across hours, percentiles within 2.5%.

Bucket ``k`` holds values in ``[RATIO**k, RATIO**(k+1))`` milliseconds; a percentile is read as the
geometric middle of its bucket, so it is within ``sqrt(RATIO) - 1`` (2.5%) of the exact value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import orjson

RATIO = 1.05
_LOG = math.log(RATIO)
FLOOR_MS = 0.01  # values below (and 0) count in the lowest bucket
ERROR_BOUND = math.sqrt(RATIO) - 1

Hist = dict[int, int]


def bucket(ms: float) -> int:
    return math.floor(math.log(max(ms, FLOOR_MS)) / _LOG)


def add(h: Hist, ms: float | None) -> None:
    if ms is not None and ms == ms:  # not NaN
        k = bucket(ms)
        h[k] = h.get(k, 0) + 1


def dumps(h: Hist) -> str:
    return orjson.dumps({str(k): v for k, v in sorted(h.items())}).decode()


def merge_json(into: Hist, text: str | None) -> None:
    if not text:
        return
    for k, v in orjson.loads(text).items():
        ik = int(k)
        into[ik] = into.get(ik, 0) + int(v)


def count(h: Hist) -> int:
    return sum(h.values())


def percentile(h: Hist, q: float) -> float | None:
    """The q-quantile (0..1) by the nearest-rank rule, as its bucket's geometric middle."""
    n = count(h)
    if n == 0:
        return None
    rank = max(1, math.ceil(q * n))
    seen = 0
    for k in sorted(h):
        seen += h[k]
        if seen >= rank:
            return RATIO ** (k + 0.5)
    return None  # pragma: no cover - rank <= n


def of(values: Iterable[float | None]) -> Hist:
    h: Hist = {}
    for v in values:
        add(h, v)
    return h
