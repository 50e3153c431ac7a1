"""Per-deployment health: circuit breaker, Retry-After cooldown, in-flight count, TTFT EWMA, RPM.

States: ``closed`` (in rotation) -> ``open`` after ``failures`` failures within ``window_s`` that
are also at least ``min_failure_rate`` of its attempts in that window, and that came from at least
``min_callers`` distinct callers (out of rotation for ``cooldown_s``) -> ``half_open`` (up to
``half_open_probes`` requests at a time are let through as probes) -> ``closed`` after
``half_open_probes`` successful probes, or back to ``open`` on a failed probe.

Callers: one tenant's bad requests (a prompt that crashes a self-hosted server, retried three times)
must not take a deployment away from every other tenant. When the window's failures are enough to
open the breaker but all come from one caller (a virtual key, or a client address without one),
only that caller is cooled down: the deployment is out of its rotation for ``cooldown_s`` and stays
in everyone else's. Per-caller state lives only on the failure path, in small bounded LRUs; a
success costs what it did before.

Time comes from an injectable clock, so tests need not sleep. All of this runs on the event loop
thread: no locks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kaiyuan.routing.settings import BreakerSettings

log = logging.getLogger("kaiyuan.routing")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}
EWMA_ALPHA = 0.3
BUCKETS = 10
MAX_FAILING_CALLERS = 64  # distinct callers remembered per deployment in the window (only "2 or more" matters)
MAX_COOLING_CALLERS = 1024  # callers cooled down per deployment at once (the least recent goes first)

Clock = Callable[[], float]
Listener = Callable[["DeploymentHealth", str, str], None]  # (health, old state, new state)


class DeploymentHealth:
    __slots__ = (
        "_bucket_fail",
        "_bucket_id",
        "_bucket_ok",
        "_bucket_w",
        "_failing",
        "_rpm_count",
        "_rpm_window",
        "_tpm_count",
        "cfg",
        "clock",
        "cooldown_reason",
        "cooldown_until",
        "cooling",
        "deployment",
        "errors",
        "ewma_ttft",
        "in_flight",
        "listener",
        "model",
        "probe_successes",
        "probes_in_flight",
        "reason",
        "since",
        "state",
        "successes",
    )

    def __init__(self, model: str, deployment: str, cfg: BreakerSettings, clock: Clock, listener: Listener | None = None) -> None:
        self.model = model
        self.deployment = deployment
        self.cfg = cfg
        self.clock = clock
        self.listener = listener
        self.state = CLOSED
        self.reason = "healthy"
        self.since = clock()
        # The window as BUCKETS buckets of (successes, failures): O(1) memory and time per outcome.
        self._bucket_w = cfg.window_s / BUCKETS
        self._bucket_id = [-1] * BUCKETS
        self._bucket_ok = [0] * BUCKETS
        self._bucket_fail = [0] * BUCKETS
        self.probes_in_flight = 0
        self.probe_successes = 0
        self.cooldown_until = 0.0  # Retry-After: do not send before this time
        self.cooldown_reason = ""
        self.in_flight = 0
        self.ewma_ttft: float | None = None
        self.successes = 0
        self.errors = 0
        self._rpm_window = -1
        self._rpm_count = 0
        self._tpm_count = 0
        self._failing: dict[str, float] = {}  # caller -> its last failure in the window (failure path only)
        self.cooling: dict[str, float] = {}  # caller -> end of its own cool-down; empty on a healthy deployment

    # -- can it take a request now? ----------------------------------------------------------
    def available(self, now: float) -> bool:
        """True when a request may be sent now (no side effects)."""
        if now < self.cooldown_until:
            return False
        if self.state == CLOSED or not self.cfg.enabled:
            return True
        if self.state == OPEN:
            return now - self.since >= self.cfg.cooldown_s
        return self.probes_in_flight < self.cfg.half_open_probes

    def acquire(self, now: float) -> bool:
        """Take the slot for one attempt; True when it is a half-open probe."""
        self.in_flight += 1
        self._count_request(now)
        if self.state == OPEN and self.cfg.enabled and now - self.since >= self.cfg.cooldown_s:
            self._move(HALF_OPEN, f"cooldown of {self.cfg.cooldown_s:g}s over; probing", now)
        if self.state == HALF_OPEN:
            self.probes_in_flight += 1
            return True
        return False

    def cooling_for(self, caller: str, now: float) -> bool:
        """Whether ``caller`` is in its own cool-down here (ask only when ``cooling`` is not empty)."""
        until = self.cooling.get(caller)
        if until is None:
            return False
        if now < until:
            return True
        del self.cooling[caller]
        return False

    def done(self) -> None:
        """The request sent by ``acquire`` has ended (its response or stream is finished)."""
        if self.in_flight > 0:
            self.in_flight -= 1

    def release(self, probe: bool) -> None:
        """Give back a probe slot without a verdict (the attempt was cancelled)."""
        if probe and self.probes_in_flight > 0:
            self.probes_in_flight -= 1

    # -- verdicts -----------------------------------------------------------------------------
    def success(self, probe: bool, ttft: float | None) -> None:
        self.release(probe)
        self.successes += 1
        if self.state == CLOSED:
            self._bucket(self.clock(), True)
        if ttft is not None:
            e = self.ewma_ttft
            self.ewma_ttft = ttft if e is None else e + EWMA_ALPHA * (ttft - e)
        if self.state == HALF_OPEN:
            self.probe_successes += 1
            if self.probe_successes >= self.cfg.half_open_probes:
                self._bucket_id = [-1] * BUCKETS
                self._move(CLOSED, f"{self.probe_successes} probe(s) succeeded", self.clock())

    def failure(self, probe: bool, reason: str, retry_after: float | None = None, caller: str | None = None) -> None:
        """A failed attempt. ``caller`` says whose request it was; ``None`` (a failure no caller can
        be blamed for) counts as every caller's, as before callers were told apart."""
        self.release(probe)
        self.errors += 1
        now = self.clock()
        if retry_after is not None and retry_after > 0:
            self.cooldown_until = max(self.cooldown_until, now + retry_after)
            self.cooldown_reason = f"Retry-After {retry_after:g}s: {reason}"
        if not self.cfg.enabled:
            return
        if self.state == HALF_OPEN:
            self._move(OPEN, f"probe failed: {reason}", now)
            return
        if self.state == OPEN:
            return
        self._bucket(now, False)
        callers = self._note_failing(caller, now) if caller is not None else self.cfg.min_callers
        ok, failed = self.window_counts(now)
        if failed < self.cfg.failures or failed < self.cfg.min_failure_rate * (ok + failed):
            return
        if callers >= self.cfg.min_callers:
            self._move(OPEN, f"{failed} of {ok + failed} attempts failed in {self.cfg.window_s:g}s "
                             f"({callers} caller(s)); last: {reason}", now)
        elif caller is not None and not self.cooling_for(caller, now):
            self._cool(caller, now, failed, ok + failed, reason)

    def _note_failing(self, caller: str, now: float) -> int:
        """Remember that ``caller`` failed now; the number of distinct callers that failed in the window."""
        failing = self._failing
        oldest = now - self.cfg.window_s
        for who in [w for w, t in failing.items() if t < oldest]:
            del failing[who]
        failing.pop(caller, None)
        failing[caller] = now  # most recent last
        if len(failing) > MAX_FAILING_CALLERS:
            del failing[next(iter(failing))]
        return len(failing)

    def _cool(self, caller: str, now: float, failed: int, total: int, reason: str) -> None:
        """Take the deployment out of ``caller``'s rotation only (the failures were all its own)."""
        if len(self.cooling) >= MAX_COOLING_CALLERS:
            del self.cooling[next(iter(self.cooling))]
        self.cooling[caller] = now + self.cfg.cooldown_s
        log.warning("model %s deployment %s: %d of %d attempts failed in %gs, all from caller %s: out of that "
                    "caller's rotation for %gs (others unaffected); last: %s", self.model, self.deployment, failed,
                    total, self.cfg.window_s, caller, self.cfg.cooldown_s, reason)

    def _bucket(self, now: float, ok: bool) -> None:
        idx = int(now // self._bucket_w)
        i = idx % BUCKETS
        if self._bucket_id[i] != idx:
            self._bucket_id[i] = idx
            self._bucket_ok[i] = 0
            self._bucket_fail[i] = 0
        if ok:
            self._bucket_ok[i] += 1
        else:
            self._bucket_fail[i] += 1

    def window_counts(self, now: float) -> tuple[int, int]:
        """(successes, failures) in the last ``window_s`` (to the nearest bucket)."""
        oldest = int(now // self._bucket_w) - BUCKETS + 1
        ok = failed = 0
        for i in range(BUCKETS):
            if self._bucket_id[i] >= oldest:
                ok += self._bucket_ok[i]
                failed += self._bucket_fail[i]
        return ok, failed

    def _move(self, new: str, reason: str, now: float) -> None:
        old = self.state
        self.state = new
        self.reason = reason
        self.since = now
        self.probe_successes = 0
        if new != HALF_OPEN:
            self.probes_in_flight = 0
        if self.listener is not None and old != new:
            self.listener(self, old, new)

    # -- RPM / TPM (fixed one-minute windows) -------------------------------------------------------
    def _count_request(self, now: float) -> None:
        w = int(now // 60)
        if w != self._rpm_window:
            self._rpm_window, self._rpm_count, self._tpm_count = w, 0, 0
        self._rpm_count += 1

    def add_tokens(self, n: int) -> None:
        self._tpm_count += n

    def over_capacity(self, now: float, rpm: int | None, tpm: int | None, max_concurrency: int | None) -> str | None:
        if max_concurrency is not None and self.in_flight >= max_concurrency:
            return f"at max_concurrency ({max_concurrency})"
        if rpm is None and tpm is None:
            return None
        if int(now // 60) != self._rpm_window:
            return None
        if rpm is not None and self._rpm_count >= rpm:
            return f"at its rpm limit ({rpm})"
        if tpm is not None and self._tpm_count >= tpm:
            return f"at its tpm limit ({tpm})"
        return None

    def describe(self, now: float) -> dict[str, object]:
        state = self.state
        reason = self.reason
        if state == OPEN and now - self.since >= self.cfg.cooldown_s:
            reason = f"{reason} (cooldown over: the next request probes it)"
        out: dict[str, object] = {
            "state": state,
            "reason": reason,
            "since_s": round(now - self.since, 3),
            "failures_in_window": self.window_counts(now)[1],
            "successes_in_window": self.window_counts(now)[0],
            "in_flight": self.in_flight,
            "successes": self.successes,
            "errors": self.errors,
            "ewma_ttft_ms": round(self.ewma_ttft * 1000, 3) if self.ewma_ttft is not None else None,
        }
        cooling = sum(1 for until in self.cooling.values() if until > now)
        if cooling:
            out["callers_cooling_down"] = cooling  # callers whose own failures took it out of their rotation
        if now < self.cooldown_until:
            out["cooling_down_s"] = round(self.cooldown_until - now, 3)
            out["cooldown_reason"] = self.cooldown_reason
        return out
