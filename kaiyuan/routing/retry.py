"""What a failed attempt means, and how long to wait before the next one.

- ``RETRY``: the deployment failed (transport error, timeout, 408/409/429/5xx/529): try another
  deployment, then the model's fallbacks. Counts against the deployment's breaker.
- ``CONTEXT_WINDOW`` / ``CONTENT_POLICY``: the upstream refused this request for a reason another
  model may not share: go to the matching fallback list, if any; else the caller gets the error.
- ``FINAL``: the upstream's verdict on the request itself (other 4xx): returned as is.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.routing.settings import RetrySettings

RETRY, CONTEXT_WINDOW, CONTENT_POLICY, FINAL = "retry", "context_window", "content_policy", "final"
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
# An upstream that rejects the gateway's own credentials or does not know the model it was
# configured with is misconfigured, not the caller's fault: fail over like an outage.
DEPLOYMENT_FAULT_STATUSES = frozenset({401, 403, 404})
RETRYABLE_KINDS = frozenset({
    ErrorKind.UPSTREAM_ERROR, ErrorKind.UPSTREAM_UNREACHABLE, ErrorKind.UPSTREAM_TIMEOUT,
    ErrorKind.OVERLOADED, ErrorKind.NO_DEPLOYMENT, ErrorKind.RATE_LIMITED,
})

_CONTEXT_CODES = frozenset({"context_length_exceeded", "string_above_max_length", "context_window_exceeded"})
_CONTEXT_TEXT = re.compile(
    r"context[ _](length|window)|maximum context|too many tokens|prompt is too long|input is too long|"
    r"reduce the length of the messages",
    re.IGNORECASE,
)
_POLICY_CODES = frozenset({"content_policy_violation", "content_filter", "data_inspection_failed"})
_POLICY_TEXT = re.compile(
    r"content[ _](management )?policy|content[ _]filter|inappropriate content|safety (system|policy)|"
    r"data_inspection_failed",
    re.IGNORECASE,
)


def classify(err: GatewayError, from_reply: bool) -> str:
    """Classify an attempt's error. ``from_reply``: it is an upstream HTTP status, not a transport error."""
    if not from_reply:
        return RETRY if err.kind in RETRYABLE_KINDS else FINAL
    status = err.status
    if status in RETRYABLE_STATUSES or status >= 500:
        return RETRY
    if status in (400, 413, 422):
        code = err.code or ""
        text = err.message
        if code in _CONTEXT_CODES or status == 413 or _CONTEXT_TEXT.search(text):
            return CONTEXT_WINDOW
        if code in _POLICY_CODES or _POLICY_TEXT.search(text):
            return CONTENT_POLICY
    if status in DEPLOYMENT_FAULT_STATUSES:
        return RETRY
    return FINAL


def retry_after_seconds(headers: Mapping[str, str] | None, now_wall: float | None = None) -> float | None:
    """``Retry-After`` (seconds or an HTTP date) or ``retry-after-ms``, in seconds; None if absent/invalid."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            v = float(ms) / 1000.0
            return v if v >= 0 else None
        except ValueError:
            pass
    ra = headers.get("Retry-After") or headers.get("retry-after")
    if not ra:
        return None
    ra = ra.strip()
    try:
        v = float(ra)
        return v if v >= 0 else None
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(ra).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now_wall is None else now_wall))


def backoff(retry: int, cfg: RetrySettings, rng: random.Random) -> float:
    """Full-jitter exponential backoff before the ``retry``-th retry of an already-tried deployment."""
    cap = min(cfg.backoff_max_s, cfg.backoff_base_s * (2 ** max(retry - 1, 0)))
    return rng.uniform(cap / 2, cap) if cap > 0 else 0.0
