"""A one-line progress bar for long offline runs: items done, items/s, trial spend so far and the
running estimate of the primary metric. Written to stderr (stdout stays the summary), and only
when stderr is a terminal or the caller asks (``--progress``), so logs and pipes stay clean.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import orjson

WIDTH = 24


class Progress:
    def __init__(self, total: int, primary: str | None, *, stream: TextIO | None = None, enabled: bool | None = None,
                 every_s: float = 0.25) -> None:
        self.total = total
        self.primary = primary
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled if enabled is not None else self.stream.isatty()
        self.every_s = every_s
        self.items = 0
        self.spent = 0.0
        self._sum = 0.0
        self._n = 0
        self._t0 = time.monotonic()
        self._last = 0.0

    def observe(self, row: dict[str, Any]) -> None:
        """Add one stored result to the running estimate (judge score, or candidate - incumbent)."""
        if self.primary == "judge":
            if row.get("judge_score") is not None:
                self._sum += float(row["judge_score"])
                self._n += 1
            return
        scores = orjson.loads(row["scores"]) if row.get("scores") else {}
        e = scores.get(self.primary or "") or {}
        if e.get("incumbent") is not None and e.get("candidate") is not None:
            self._sum += float(e["candidate"]) - float(e["incumbent"])
            self._n += 1

    def item_done(self, spent: float) -> None:
        self.items += 1
        self.spent = spent
        now = time.monotonic()
        if self.enabled and (now - self._last >= self.every_s or self.items == self.total):
            self._last = now
            self.stream.write("\r" + self.line(now))
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self._t0, 1e-9)
        share = self.items / self.total if self.total else 1.0
        bar = "#" * int(share * WIDTH) + "." * (WIDTH - int(share * WIDTH))
        label = "judge score" if self.primary == "judge" else f"{self.primary} diff"
        fmt = ".3f" if self.primary == "judge" else "+.3f"
        est = f"{label} {format(self._sum / self._n, fmt)} (n={self._n})" if self._n else f"{label} -"
        return f"[{bar}] {self.items}/{self.total} items  {self.items / elapsed:.1f} items/s  ${self.spent:.4f}  {est}"

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
