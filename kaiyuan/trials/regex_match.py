"""Regular expressions from trial configs and datasets: checked when they arrive, matched with a
hard time limit.

A trial's ``regex`` scorer once ran a catastrophic pattern (``(a|aa)+$`` on a long answer) on the
event loop and froze the gateway for 15 s. Patterns are user input, so they are matched with the
``regex`` module, whose matcher takes a ``timeout`` and gives the GIL back while it works on a str:
a runaway match ends with :class:`MatchTimeout` after ``timeout_s``, and the thread it runs in
(see :func:`kaiyuan.trials.evaluate.score_off_loop`) never holds the loop. Why this and not a
killed process worker: docs/dependencies.md.
"""

from __future__ import annotations

from functools import lru_cache

import regex

DEFAULT_TIMEOUT_S = 1.0
MAX_PATTERN_CHARS = 10_000


class MatchTimeout(Exception):
    """A match ran past its time limit: the scorer scores it as a failure, with this reason."""


def check_pattern(pattern: str) -> str:
    """``pattern`` if it compiles, else ValueError saying why (for config, admin and dataset checks)."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"regex pattern is {len(pattern)} characters long; at most {MAX_PATTERN_CHARS}")
    try:
        _compiled(pattern)
    except regex.error as e:
        raise ValueError(f"invalid regex pattern {pattern[:200]!r}: {e}") from None
    return pattern


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> regex.Pattern[str]:
    return regex.compile(pattern)


def search(pattern: str, text: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether ``pattern`` matches somewhere in ``text``, within ``timeout_s`` of matching time.
    Raises ValueError for a pattern that does not compile, :class:`MatchTimeout` past the limit."""
    try:
        compiled = _compiled(pattern)
    except regex.error as e:
        raise ValueError(f"invalid regex pattern {pattern[:200]!r}: {e}") from None
    try:
        return compiled.search(text, timeout=timeout_s) is not None
    except TimeoutError:
        raise MatchTimeout(f"regex {pattern[:100]!r} did not finish within {timeout_s:g}s on a "
                           f"{len(text)}-character answer (catastrophic backtracking?); scored as no match") from None
