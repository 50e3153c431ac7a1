"""The canary guard: the decision rule on hand-made streams with a known truth, then end to end -
a failing candidate is rolled back automatically during a canary and again after a promotion,
the action is recorded, logged and shown by ``kaiyuan trial status``."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from pydantic import ValidationError

from kaiyuan.cli import main
from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI
from kaiyuan.testing.server_thread import ServerThread
from kaiyuan.trials.guard import Watch
from kaiyuan.trials.models import GuardSettings, TrialConfig
from tests.conftest import _served, openai_model
from tests.test_trials_shadow import runtime_of


def row(ts: float = 1.0, ms: float = 100.0, error: str | None = None, judge: float | None = None) -> dict[str, Any]:
    return {"ts": ts, "candidate_ms": ms, "candidate_error": error, "judge_score": judge}


def stream(rng: random.Random, n: int, error_rate: float = 0.0, slow: float = 0.0, loss: float = 0.0) -> Iterator[dict[str, Any]]:
    for _ in range(n):
        yield row(ms=5000.0 if rng.random() < slow else 100.0, error="HTTP 500" if rng.random() < error_rate else None,
                  judge=0.0 if rng.random() < loss else 1.0)


def first_breach(w: Watch, rows: Iterator[dict[str, Any]]) -> Any:
    return next((b for b in (w.observe(r) for r in rows) if b is not None), None)


def test_each_line_trips_when_clearly_crossed_and_not_when_clearly_below() -> None:
    rng = random.Random(5)
    g = GuardSettings(max_error_rate=0.05, max_p95_ms=1000, max_loss_rate=0.4, min_results=10)
    b = first_breach(Watch(g, 0.05, 0.0), stream(rng, 500, error_rate=0.3))
    assert b is not None and b.metric == "error_rate" and b.lo > 0.05 and b.n >= 10
    assert "error rate" in b.note() and "wholly above 0.05" in b.note()
    b = first_breach(Watch(g, 0.05, 0.0), stream(rng, 500, slow=0.3))
    assert b is not None and b.metric == "p95_latency" and b.lo > 0.05  # more than 5% slower than the line
    b = first_breach(Watch(g, 0.05, 0.0), stream(rng, 500, loss=0.8))
    assert b is not None and b.metric == "loss_rate"
    # healthy: 1% errors, 2% slow, 20% losses - watched continuously for 3,000 results, no rollback
    for seed in range(5):
        w = Watch(g, 0.05, 0.0)
        assert first_breach(w, stream(random.Random(seed), 3000, error_rate=0.01, slow=0.02, loss=0.2)) is None
        st = w.status()
        assert st["tripped"] is None and st["error_rate"]["n"] == 3000 and st["loss_rate"]["lo"] < 0.4


def test_false_rollbacks_stay_rare_at_the_line() -> None:
    """Exactly at the line, looked at after every result: a rollback in at most alpha/2 of windows."""
    g = GuardSettings(max_error_rate=0.1, min_results=1)
    trips = sum(first_breach(Watch(g, 0.05, 0.0), stream(random.Random(s), 400, error_rate=0.1)) is not None
                for s in range(150))
    assert trips / 150 <= 0.05


def test_min_results_window_and_one_breach_per_window() -> None:
    g = GuardSettings(max_error_rate=0.05, min_results=30)
    w = Watch(g, 0.05, since=100.0)
    assert w.observe(row(ts=50.0, error="x")) is None and "error_rate" not in w.seqs  # before the window
    bad = [row(ts=200.0, error="x") for _ in range(40)]
    trips = [i for i, r in enumerate(bad) if w.observe(r) is not None]
    assert trips == [29]  # not before min_results, and once: the window is over
    assert w.observe(row(ts=300.0, ms=None)) is None  # type: ignore[arg-type]


def test_guard_settings_are_validated() -> None:
    with pytest.raises(ValidationError, match="at least one of"):
        GuardSettings()
    with pytest.raises(ValidationError):
        GuardSettings(max_error_rate=1.5)
    base = {"name": "t", "incumbent": "a", "candidates": ["b"]}
    with pytest.raises(ValidationError, match="offline trial has none"):
        TrialConfig.model_validate({**base, "mode": "offline", "guard": {"max_error_rate": 0.1}})
    with pytest.raises(ValidationError, match="needs a judge"):
        TrialConfig.model_validate({**base, "mode": "canary", "guard": {"max_loss_rate": 0.3}})


@pytest.fixture
def small(servers: ServerThread) -> Iterator[FakeOpenAI]:
    """The candidate's upstream, on its own server so it can fail while the incumbent answers."""
    yield from _served(servers, FakeOpenAI(api_key="sk-upstream"))


def ask(gw: Any) -> str | None:
    c = openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0)
    try:
        return c.chat.completions.create(model="gpt-big", messages=[{"role": "user", "content": "hi"}]).model
    except openai.APIStatusError:
        return None


def until_rolled_back(gw: Any, rt: Any, limit: int = 40) -> int:
    """Ask until an answer comes back (from the incumbent); the number of failed answers before it."""
    failed = 0
    for _ in range(limit):
        if ask(gw) is not None:
            return failed
        failed += 1
        if failed % 5 == 0:
            gw.servers.call(rt.flush())  # what the background loop does every second anyway
    raise AssertionError("never rolled back")


def test_failing_candidate_is_rolled_back_during_canary_and_after_promotion(
        make_gateway: Any, fake_openai: FakeOpenAI, small: FakeOpenAI, tmp_path: Path, capsys: Any) -> None:
    trial = {"name": "ca", "mode": "canary", "incumbent": "gpt-big", "candidates": ["qwen-small"], "sample_rate": 1.0,
             "guard": {"max_error_rate": 0.2, "min_results": 5}}
    gw = make_gateway({"models": [openai_model("gpt-big", fake_openai.url, "big"),  # type: ignore[attr-defined]
                                  openai_model("qwen-small", small.url, "small")], "trials": [trial]})  # type: ignore[attr-defined]
    cfg = tmp_path / "k.yaml"
    cfg.write_text(yaml.safe_dump(gw.config.model_dump(mode="json", by_alias=True, exclude_none=True)))
    rt = runtime_of(gw)
    small.default = Behaviour(status=500)
    assert until_rolled_back(gw, rt) >= 5  # the whole canary arm fails, then the guard acts
    assert rt.store is not None
    hist = rt.store.routing_history("ca")
    assert [(h["action"], h["actor"]) for h in hist] == [("rollback", "guard")]
    assert "error rate 1.000" in hist[0]["note"] and "wholly above 0.2" in hist[0]["note"]
    assert rt.status()[0]["halted"] and rt.status()[0]["counters"]["guard_rollbacks"] == 1
    assert fake_openai.requests[-1]["model"] == "big"  # back on the incumbent
    assert main(["trial", "status", "ca", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "AUTOMATIC rollback of qwen-small" in out and "error rate 1.000" in out
    # promoted anyway: the guard watches the promoted traffic, and rolls it back again
    assert main(["trial", "promote", "ca", "--config", str(cfg)]) == 0
    gw.servers.call(rt._refresh())
    assert not rt.status()[0]["halted"] and rt.status()[0]["guard"]["tripped"] is None
    failed = until_rolled_back(gw, rt)
    assert failed >= 5
    assert [(h["action"], h["actor"]) for h in rt.store.routing_history("ca")][-1] == ("rollback", "guard")
    assert "gpt-big" not in rt.overrides and fake_openai.requests[-1]["model"] == "big"
    gw.servers.call(rt.flush())
    promoted = [r for r in rt.store.results("ca") if r["source"] == "promoted"]
    assert len(promoted) == failed and all(r["candidate_error"] for r in promoted)
    assert main(["trial", "status", "ca", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert out.count("AUTOMATIC rollback") == 2 and f"after promotion: {failed} answers, error rate 1.000" in out


def test_healthy_promotion_is_watched_and_left_alone(make_gateway: Any, fake_openai: FakeOpenAI, small: FakeOpenAI,
                                                     tmp_path: Path) -> None:
    trial = {"name": "sh", "mode": "shadow", "incumbent": "gpt-big", "candidates": ["qwen-small"], "sample_rate": 0.0,
             "guard": {"max_error_rate": 0.2, "max_p95_ms": 60000, "min_results": 5}}
    gw = make_gateway({"models": [openai_model("gpt-big", fake_openai.url, "big"),  # type: ignore[attr-defined]
                                  openai_model("qwen-small", small.url, "small")], "trials": [trial]})  # type: ignore[attr-defined]
    cfg = tmp_path / "k.yaml"
    cfg.write_text(yaml.safe_dump(gw.config.model_dump(mode="json", by_alias=True, exclude_none=True)))
    rt = runtime_of(gw)
    assert rt.status()[0]["guard"] is None  # a shadow trial's candidate answers no one until promoted
    assert main(["trial", "promote", "sh", "--config", str(cfg)]) == 0
    gw.servers.call(rt._refresh())
    assert all(ask(gw) is not None for _ in range(12)) and len(small.requests) == 12
    gw.servers.call(rt.flush())
    assert rt.store is not None and rt.store.routing_history("sh")[-1]["action"] == "promote"
    g = rt.status()[0]["guard"]
    assert g["tripped"] is None and g["error_rate"]["n"] == 12 and g["error_rate"]["estimate"] == 0.0
