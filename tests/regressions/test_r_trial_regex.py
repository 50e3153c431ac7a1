"""Issue 9, section 3: a trial's regex scorer with a catastrophic pattern froze the event loop for
15 s. Scorers now run in a small thread pool, off the loop, and a regex is matched by the ``regex``
module with a time limit (``scorers[].timeout_s``): past it the answer scores 0 and the reason is
recorded. Patterns are checked when they arrive: config, admin API and dataset lines."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from kaiyuan.config import ConfigError, parse_config
from kaiyuan.testing.fake_openai import FakeOpenAI
from kaiyuan.trials import regex_match
from kaiyuan.trials.dataset import DatasetError, parse_line
from kaiyuan.trials.scorers import Answer, score_pair
from kaiyuan.trials.scorers import regex as regex_scorer
from tests.conftest import openai_model
from tests.test_trials_shadow import runtime_of, wait_for

CATASTROPHIC = "(a|aa)+$"  # exponential backtracking on a long run of a's that does not end the text
SLOW_TEXT = "a" * 60 + "b"


def test_a_runaway_match_times_out_and_scores_zero_with_the_reason() -> None:
    with pytest.raises(regex_match.MatchTimeout) as e:
        regex_match.search(CATASTROPHIC, SLOW_TEXT, timeout_s=0.05)
    assert "did not finish within 0.05s" in str(e.value)
    assert regex_match.search(CATASTROPHIC, "aaaa", timeout_s=0.05)  # a quick match is still a match
    scorers: dict[str, Any] = {"rx": lambda a, i: regex_scorer(a, i, CATASTROPHIC, 0.05)}
    out = score_pair(scorers, Answer("fine"), Answer(SLOW_TEXT), {})
    assert out["rx"]["incumbent"] == 0.0 and out["rx"]["candidate"] == 0.0
    assert any("candidate: timed out" in err for err in out["rx"]["errors"])


def test_the_gateway_answers_other_requests_while_a_catastrophic_regex_runs(make_gateway: Any,
                                                                           fake_openai: FakeOpenAI) -> None:
    url = fake_openai.url  # type: ignore[attr-defined]
    gw = make_gateway({
        "models": [openai_model("gpt-big", url, "big"), openai_model("qwen-small", url, "small")],
        "trials": [{"name": "rx", "mode": "shadow", "incumbent": "gpt-big", "candidates": ["qwen-small"],
                    "sample_rate": 1.0, "max_concurrency": 1,
                    "scorers": [{"type": "regex", "pattern": CATASTROPHIC, "timeout_s": 3}]}],
    })
    rt = runtime_of(gw)
    c = openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=30)
    c.chat.completions.create(model="gpt-big", messages=[{"role": "user", "content": SLOW_TEXT}])
    # the mirrored call came back: scoring (two runaway matches, up to 3 s each) starts now
    wait_for(lambda: rt.counters["rx"]["candidate_calls"] == 1, "the shadow call")
    seen_before_the_result = []
    for i in range(5):  # other requests, one after another, while the scorer runs
        r = c.chat.completions.create(model="qwen-small", messages=[{"role": "user", "content": f"q{i}"}])
        assert r.choices[0].message.content == f"echo: q{i}"
        seen_before_the_result.append(rt.counters["rx"]["results"] == 0)
    # every one of them was answered before the scorer finished (on the loop, none could have been)
    assert seen_before_the_result == [True] * 5
    wait_for(lambda: rt.counters["rx"]["results"] == 1, "the scored result", limit=30)
    gw.servers.call(rt.flush())
    assert rt.store is not None
    [row] = rt.store.results("rx")
    scores = json.loads(row["scores"])["regex"]
    assert scores["incumbent"] == 0.0 and scores["candidate"] == 0.0
    assert any("timed out" in e for e in scores["errors"])


def test_bad_patterns_are_refused_where_they_arrive(make_gateway: Any, fake_openai: FakeOpenAI) -> None:
    url = fake_openai.url  # type: ignore[attr-defined]
    models = [openai_model("gpt-big", url, "big"), openai_model("qwen-small", url, "small")]

    def trial(**scorer: Any) -> dict[str, Any]:
        return {"name": "bad", "mode": "shadow", "incumbent": "gpt-big", "candidates": ["qwen-small"],
                "scorers": [{"type": "regex", **scorer}]}

    for scorer, words in (({"pattern": "(unclosed"}, "invalid regex pattern"),
                          ({"pattern": "x" * 10_001}, "at most 10000"),
                          ({"pattern": "a", "timeout_s": 0}, "timeout_s"),
                          ({"pattern": "a", "timeout_s": "soon"}, "timeout_s")):
        with pytest.raises(ConfigError) as e:
            parse_config({"models": models, "trials": [trial(**scorer)]})
        assert words in str(e.value) and "trials" in str(e.value) and "scorers" in str(e.value)
    master = "sk-master-regex"
    gw = make_gateway({"server": {"master_key": master}, "models": models})
    r = httpx.post(gw.url + "/admin/trials", json=trial(pattern="a{2,1}"), headers={"Authorization": f"Bearer {master}"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_trial" and "scorers.0.pattern" in err["message"] and "invalid regex" in err["message"]
    for line, words in (({"messages": [{"role": "user", "content": "x"}], "pattern": "[z-a]"}, "invalid regex"),
                        ({"messages": [{"role": "user", "content": "x"}], "pattern": 7}, "must be a string")):
        with pytest.raises(DatasetError) as de:
            parse_line(line, "data.jsonl:3", 2)
        assert "data.jsonl:3" in str(de.value) and words in str(de.value)
    ok = parse_line({"messages": [{"role": "user", "content": "x"}], "pattern": r"^\d+$"}, "data.jsonl:4", 3)
    assert ok.meta["pattern"] == r"^\d+$"


async def test_scoring_that_hangs_is_given_up_not_waited_for_forever(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from kaiyuan.trials import evaluate

    release = threading.Event()

    def hangs(_a: Answer, _i: dict[str, Any]) -> float:  # a plugin stuck until the test lets it go
        release.wait(30)
        return 1.0

    monkeypatch.setattr(evaluate, "SCORING_WAIT_S", 0.2)
    try:
        out = await evaluate.score_off_loop({"slow": hangs, "rx": lambda a, i: regex_scorer(a, i, "^ok")},
                                            Answer("ok"), Answer("ok"), {})
    finally:
        release.set()
    assert out["slow"]["candidate"] is None and out["rx"]["candidate"] is None  # the pair is not scored
    assert "did not finish within 0.2s" in out["slow"]["errors"][0]
    # once the plugin returns, the pool scores again
    again = await evaluate.score_off_loop({"rx": lambda a, i: regex_scorer(a, i, "^ok")}, Answer("ok"), Answer("no"), {})
    assert again["rx"] == {"incumbent": 1.0, "candidate": 0.0}
