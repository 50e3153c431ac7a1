"""Power and false acceptance of trial verdicts, by simulation (numbers for docs/trials.md).

Compares the drift-robust betting confidence sequence (``kaiyuan.trials.sequential``), the
sequence it replaced (predictable plug-in empirical Bernstein with a running intersection, kept
here verbatim as ``legacy_cs`` for the comparison only) and a fixed-horizon interval read once.
Every sequential method is peeked at after every item and stops at the first acceptance.

    python -m bench.trials_power [--reps 1000]
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Callable, Sequence

from kaiyuan.trials import sequential as sq


def legacy_cs(xs: Sequence[float], alpha: float = 0.05, cap: float = 0.5) -> list[tuple[float, float]]:
    """The previous method (Waudby-Smith & Ramdas PrPl-EB, Thm. 2, running intersection)."""
    log_term = math.log(2 / alpha)
    out = []
    sum_lam = sum_lam_x = sum_v_psi = sum_x = sum_sq = 0.0
    mu_prev, sigma2_prev, lo_run, hi_run = 0.5, 0.25, 0.0, 1.0
    for t, x in enumerate(xs, start=1):
        lam = min(math.sqrt(2 * log_term / (sigma2_prev * t * math.log(1 + t))), cap)
        sum_lam += lam
        sum_lam_x += lam * x
        sum_v_psi += 4 * (x - mu_prev) ** 2 * (-math.log(1 - lam) - lam) / 4
        centre, width = sum_lam_x / sum_lam, (log_term + sum_v_psi) / sum_lam
        lo_run, hi_run = max(lo_run, centre - width), min(hi_run, centre + width)
        sum_x += x
        mu_prev = (0.5 + sum_x) / (t + 1)
        sum_sq += (x - mu_prev) ** 2
        sigma2_prev = (0.25 + sum_sq) / (t + 1)
        out.append((max(lo_run, 0.0), min(hi_run, 1.0)))
    return out


def paired_items(rng: random.Random, n: int, diff: float, disagree: float) -> list[float]:
    """Paired differences d in {-1, 0, 1} as x = (d + 1) / 2: the two answers disagree on a
    ``disagree`` share of items and E[d] = ``diff``."""
    win = (disagree + diff) / 2
    out = []
    for _ in range(n):
        u = rng.random()
        out.append(1.0 if u < win else 0.0 if u < disagree else 0.5)
    return out


def accepts_new(xs: Sequence[float], thr: float, alpha: float) -> bool:
    cs = sq.ConfidenceSequence(alpha)
    for x in xs:
        cs.update(x)
        if cs.above(thr):
            return True
    return False


def accepts_legacy(xs: Sequence[float], thr: float, alpha: float) -> bool:
    return any(lo > thr for lo, _ in legacy_cs(xs, alpha))


def accepts_fixed(xs: Sequence[float], thr: float, alpha: float) -> bool:
    return sq.fixed_horizon_interval(xs, alpha).lo > thr


METHODS: dict[str, Callable[[Sequence[float], float, float], bool]] = {
    "betting CS (new, peeking)": accepts_new, "EB CS (old, peeking)": accepts_legacy, "fixed horizon (read once)": accepts_fixed}


def acceptance(method: Callable[[Sequence[float], float, float], bool], n: int, diff: float, margin: float,
               disagree: float, reps: int, seed: int, alpha: float = 0.05) -> float:
    rng = random.Random(seed)
    thr = (1 - margin) / 2
    return sum(method(paired_items(rng, n, diff, disagree), thr, alpha) for _ in range(reps)) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=1000)
    ap.add_argument("--margin", type=float, default=0.10)
    args = ap.parse_args()
    m = args.margin
    print(f"margin {m}, alpha 0.05, {args.reps} simulated trials per cell; share accepted as non-inferior")
    print("| answers differ on | true difference | n | " + " | ".join(METHODS) + " |")
    print("|---|---|---|" + "---|" * len(METHODS))
    for disagree, diffs in ((0.30, (-m, -m + 0.05, 0.0)), (0.05, (0.0,))):
        for diff in diffs:
            for n in (100, 200, 400, 800):
                cells = [acceptance(f, n, diff, m, disagree, args.reps, seed=n) for f in METHODS.values()]
                print(f"| {disagree:.0%} | {diff:+.2f} | {n} | " + " | ".join(f"{c:.1%}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
