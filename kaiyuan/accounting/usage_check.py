"""Token counts an upstream reports are input, not truth: validate and clamp them before they are
priced, counted against a budget or written to the ledger.

Two steps, each written once:

- :func:`reported_tokens` (used by every dialect's usage parser): a count must be a whole number
  >= 0. A float with a whole value (``3e9``) is taken as that number, other floats are rounded up,
  a string of digits is read, ``null``/booleans/anything else is "not reported". Negatives become
  "not reported" too (a count below zero is no count), anything above :data:`MAX_TOKENS` becomes
  :data:`MAX_TOKENS`. Never raises.
- :func:`clamp_to_plausible` (at settle): an answer cannot hold more output tokens than the larger
  of the cap the gateway sent (``cap x n``) and the bytes the upstream actually sent (every token
  is at least one byte); a larger report is taken as the cap (what was reserved). A prompt cannot
  hold more tokens than its request body has bytes, plus :data:`TOKENS_PER_MEDIA_PART` per image,
  audio or file part (a few bytes of URL, many tokens); a larger report is replaced by the
  gateway's own count. A report missing one of the two is completed the same way.

Every clamped value is logged as suspicious, with the request id, so the vendor's bill can be
checked against it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from kaiyuan.context import Usage

log = logging.getLogger("kaiyuan.accounting")

MAX_TOKENS = 100_000_000  # no model reads or writes this many tokens in one request
TOKENS_PER_MEDIA_PART = 20_000  # the most one image/audio/file part is billed (large Qwen-VL images)
OUTPUT_SLACK = 16  # framing tokens (role, end of turn) a capped answer may add


def reported_tokens(v: Any, what: str = "tokens") -> int | None:
    """A reported token count, validated (see the module docstring); None when not reported."""
    odd = False
    if isinstance(v, int) and not isinstance(v, bool):
        n = v
    elif isinstance(v, float) and math.isfinite(v):
        n, odd = math.ceil(v), not v.is_integer()
    elif isinstance(v, str) and v.strip().isdigit():
        n, odd = int(v.strip()), True
    else:
        if v is not None:
            log.warning("suspicious usage from upstream: %s = %.80r, treated as not reported", what, v)
        return None
    if n < 0:
        log.warning("suspicious usage from upstream: %s = %.80r, treated as not reported", what, v)
        return None
    clamped = min(n, MAX_TOKENS)
    if odd or clamped != n:
        log.warning("suspicious usage from upstream: %s = %.80r, taken as %d", what, v, clamped)
    return clamped


def image_slack(body: bytes) -> int:
    """Tokens a prompt may hold beyond its bytes: images, audio and files sent by URL or id."""
    parts = body.count(b"image") + body.count(b"input_audio") + body.count(b'"document"') + body.count(b'"file"')
    return parts * TOKENS_PER_MEDIA_PART


def clamp_to_plausible(u: Usage, request_id: str, body: bytes, upstream_bytes: int, output_cap: int | None,
                       choices: int, count_prompt: Callable[[], int]) -> None:
    """Clamp ``u`` (in place) to what this request could really have used. When the upstream
    reported only part of its usage, the rest is filled in: the prompt as the gateway counts it,
    the output as the cap (the worst case, as for an answer with no usage at all)."""
    if u.prompt_tokens is None and u.completion_tokens is None:
        return
    if u.prompt_tokens is None:
        u.prompt_tokens = count_prompt()
        log.warning("suspicious usage on request %s: no usable prompt_tokens reported; counted %d", request_id, u.prompt_tokens)
    elif u.prompt_tokens > len(body) and u.prompt_tokens > len(body) + image_slack(body):
        counted = count_prompt()
        log.warning("suspicious usage on request %s: prompt_tokens %d for a %d-byte request; counted %d instead",
                    request_id, u.prompt_tokens, len(body), counted)
        u.prompt_tokens = counted
    for name in ("cached_tokens", "cache_write_tokens"):
        v = getattr(u, name)
        if v is not None and v > u.prompt_tokens:
            setattr(u, name, u.prompt_tokens)
    if u.completion_tokens is None:
        if output_cap is not None:
            u.completion_tokens = output_cap * choices
            log.warning("suspicious usage on request %s: no usable completion_tokens reported; charged the cap, %d",
                        request_id, u.completion_tokens)
        return
    cap = output_cap * choices if output_cap is not None else None
    if u.completion_tokens > max(cap or 0, upstream_bytes) + OUTPUT_SLACK:
        # more than the bytes that came back, and more than the cap: not a count, so charge the cap
        # (what was reserved), or the bytes when no cap was sent
        taken = cap if cap is not None else upstream_bytes
        log.warning("suspicious usage on request %s: completion_tokens %d with an output cap of %s x %d and %d "
                    "bytes received; taken as %d", request_id, u.completion_tokens, output_cap, choices,
                    upstream_bytes, taken)
        u.completion_tokens = taken
    if u.reasoning_tokens is not None and u.reasoning_tokens > u.completion_tokens:
        u.reasoning_tokens = u.completion_tokens
