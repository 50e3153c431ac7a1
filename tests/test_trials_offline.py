"""Offline trials end to end: a JSONL dataset replayed through a real gateway to fake quiz upstreams
with known accuracy, judged and scored, then reported by the CLI."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from kaiyuan.cli import main
from kaiyuan.testing.fake_quiz import FakeQuiz, quiz_items
from kaiyuan.testing.harness import RunningGateway
from kaiyuan.testing.server_thread import ServerThread
from tests.conftest import openai_model


@pytest.fixture
def quiz(servers: ServerThread) -> Any:
    fake = FakeQuiz({"big": 0.85, "small": 0.70}, api_key="sk-upstream", seed=1)
    fake.url = servers.serve(fake.app)  # type: ignore[attr-defined]
    yield fake
    servers.stop(fake.app)


def trial_def(**over: Any) -> dict[str, Any]:
    t = {
        "name": "quiz", "mode": "offline", "incumbent": "gpt-big", "candidates": ["qwen-small"],
        "judge": {"model": "judge"}, "scorers": [{"type": "numeric"}], "primary": "numeric", "margin": 0.4,
        "prices": {"gpt-big": {"input_per_mtok": 10, "output_per_mtok": 30},
                   "qwen-small": {"input_per_mtok": 1, "output_per_mtok": 2},
                   "judge": {"input_per_mtok": 1, "output_per_mtok": 1}},
    }
    t.update(over)
    return t


def quiz_models(url: str) -> list[dict[str, Any]]:
    return [openai_model("gpt-big", url, "big"), openai_model("qwen-small", url, "small"), openai_model("judge", url, "quiz-judge")]


def setup(make_gateway: Callable[[dict[str, Any]], RunningGateway], quiz: FakeQuiz, tmp_path: Path, n: int, **over: Any
          ) -> tuple[RunningGateway, Path, Path]:
    gw = make_gateway({"models": quiz_models(quiz.url), "trials": [trial_def(**over)]})  # type: ignore[attr-defined]
    cfg = tmp_path / "kaiyuan.yaml"
    cfg.write_text(yaml.safe_dump(gw.config.model_dump(mode="json", by_alias=True, exclude_none=True)))
    data = tmp_path / "quiz.jsonl"
    data.write_bytes(b"\n".join(orjson.dumps(r) for r in quiz_items(n, seed=4)) + b"\n")
    return gw, cfg, data


def run_cli(cfg: Path, *args: str) -> int:
    return main(["trial", *args, "--config", str(cfg)])


def test_offline_quiz_trial_end_to_end(make_gateway: Any, quiz: FakeQuiz, tmp_path: Path, capsys: Any) -> None:
    gw, cfg, data = setup(make_gateway, quiz, tmp_path, 200)
    assert run_cli(cfg, "run", "quiz", "--dataset", str(data), "--gateway", gw.url, "--concurrency", "8") == 0
    out = capsys.readouterr().out
    assert "replayed 200 item(s): 200 pair(s), 0 candidate failure(s)" in out
    js = tmp_path / "r.json"
    html = tmp_path / "r.html"
    assert run_cli(cfg, "report", "quiz", "--json", str(js), "--html", str(html), "--resamples", "400") == 0
    text = capsys.readouterr().out
    assert "VERDICT (reference_difference, margin 0.4): NON_INFERIOR" in text, text
    assert "replay order: seeded random, seed 0" in text
    # a rerun of the report prints the very same intervals (rows sorted, bootstrap seeded)
    assert run_cli(cfg, "report", "quiz", "--resamples", "400") == 0
    assert capsys.readouterr().out.splitlines()[:12] == text.splitlines()[:12]
    rep = orjson.loads(js.read_bytes())
    c = rep["by_candidate"][0]
    means = c["scorers"]["numeric"]["means"]
    # the quiz answers correctly on a fixed subset of the stated size: observed rates near the truth
    assert means["incumbent"]["lo"] <= 0.85 + 0.06 and means["incumbent"]["hi"] >= 0.85 - 0.06
    assert means["candidate"]["lo"] <= 0.70 + 0.06 and means["candidate"]["hi"] >= 0.70 - 0.06
    assert means["difference"]["rate"] < 0
    j = c["judge"]
    assert j["n"] == 200 and j["unparsable"] == 0
    # the judge agrees with the reference: candidate wins only where it is right and the incumbent wrong
    assert j["rates"]["loss"]["rate"] > j["rates"]["win"]["rate"]
    assert c["cost"]["candidate_per_1k_usd"] < c["cost"]["incumbent_per_1k_usd"]
    assert rep["spend"]["total_usd"] > 0 and set(rep["spend"]["by_kind"]) == {"incumbent", "candidate", "judge"}
    page = html.read_text()
    assert page.count("<svg") >= 4 and "<script" not in page and "Largest disagreements" in page
    # trials run through the gateway: the calls are in its request log
    models = {r["model"] for r in gw.log_rows()}
    assert models == {"gpt-big", "qwen-small", "judge"}
    # the same results judged at a margin smaller than the true gap (0.15): the verdict flips
    assert run_cli(cfg, "status", "quiz", "--margin", "0.02", "--resamples", "100") == 0
    assert "margin 0.02): INFERIOR" in capsys.readouterr().out
    # fixed horizon: one look at a planned size; before it is reached, no verdict and how many to go
    assert run_cli(cfg, "status", "quiz", "--planned-n", "150", "--resamples", "50") == 0
    assert "fixed-horizon CI (planned n=150)" in capsys.readouterr().out
    assert run_cli(cfg, "status", "quiz", "--planned-n", "500", "--resamples", "50") == 0
    assert "read once the planned 500 results are in (300 to go)" in capsys.readouterr().out
    assert run_cli(cfg, "status", "quiz", "--planned-n", "5") == 2
    assert "planned_n" in capsys.readouterr().err




def test_unparsable_judge_and_failing_candidate_are_reported(make_gateway: Any, quiz: FakeQuiz, tmp_path: Path, capsys: Any) -> None:
    gw, cfg, data = setup(make_gateway, quiz, tmp_path, 6)
    quiz.judge_garbage = True
    assert run_cli(cfg, "run", "quiz", "--dataset", str(data), "--gateway", gw.url, "--concurrency", "1") == 0
    assert "6 unparsable judge output(s)" in capsys.readouterr().out
    js = tmp_path / "r.json"
    assert run_cli(cfg, "report", "quiz", "--json", str(js), "--resamples", "50") == 0
    j = orjson.loads(js.read_bytes())["by_candidate"][0]["judge"]
    assert j["n"] == 0 and j["unparsable"] == 6 and "rates" not in j  # excluded, never scored
    assert "cannot decide" in str(j["unparsable_examples"][0]["judge_output"])
    # now the candidate fails: failures are counted and score as losses, not dropped
    quiz.judge_garbage = False
    quiz.fail_models = {"small"}
    assert run_cli(cfg, "run", "quiz", "--dataset", str(data), "--gateway", gw.url, "--fresh", "--concurrency", "1") == 0
    assert "6 pair(s), 6 candidate failure(s), 0 incumbent failure(s)" in capsys.readouterr().out
    assert run_cli(cfg, "report", "quiz", "--json", str(js), "--resamples", "50") == 0
    c = orjson.loads(js.read_bytes())["by_candidate"][0]
    assert c["pairs"] == 6 and c["failures"]["candidate"] == 6 and "HTTP 500" in c["failures"]["candidate_errors"][0]
    assert c["judge"]["status_counts"] == {"candidate_failed": 6}
    assert c["judge"]["rates"]["loss"]["rate"] == 1.0  # a failure is a loss, not a dropped sample
    assert c["scorers"]["numeric"]["means"]["candidate"]["rate"] == 0.0


def test_bad_datasets_and_unknown_trials(make_gateway: Any, quiz: FakeQuiz, tmp_path: Path, capsys: Any) -> None:
    gw, cfg, _ = setup(make_gateway, quiz, tmp_path, 2)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert run_cli(cfg, "run", "quiz", "--dataset", str(empty), "--gateway", gw.url) == 2
    assert "the dataset is empty" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [oops\n{"request": {"messages": []}}\n')
    assert run_cli(cfg, "run", "quiz", "--dataset", str(bad), "--gateway", gw.url) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: not valid JSON" in err and "bad.jsonl:3:" in err and "2 bad line(s)" in err
    assert run_cli(cfg, "status", "nope") == 2
    assert "no trial named 'nope'" in capsys.readouterr().err


def test_replay_from_the_request_log(make_gateway: Any, quiz: FakeQuiz, tmp_path: Path, capsys: Any) -> None:
    models = quiz_models(quiz.url)  # type: ignore[attr-defined]
    models[0]["log_bodies"] = True
    gw = make_gateway({"models": models, "trials": [trial_def(judge=None)]})
    cfg = tmp_path / "kaiyuan.yaml"
    cfg.write_text(yaml.safe_dump(gw.config.model_dump(mode="json", by_alias=True, exclude_none=True)))
    assert run_cli(cfg, "run", "quiz", "--from-log", "5", "--gateway", gw.url) == 2
    assert "no logged chat requests for model 'gpt-big'" in capsys.readouterr().err
    import openai

    c = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0)
    for item in quiz_items(4, seed=9):
        c.chat.completions.create(model="gpt-big", messages=item["messages"])
    gw.flush_logs()
    assert run_cli(cfg, "run", "quiz", "--from-log", "3", "--gateway", gw.url) == 0
    assert "replayed 3 item(s): 3 pair(s)" in capsys.readouterr().out


def test_offline_budget_cap_and_policy(make_gateway: Any, quiz: FakeQuiz, tmp_path: Path, capsys: Any) -> None:
    gw, cfg, data = setup(make_gateway, quiz, tmp_path, 30, budget_usd=0.0005, judge=None)
    assert run_cli(cfg, "run", "quiz", "--dataset", str(data), "--gateway", gw.url, "--concurrency", "1") == 0
    out = capsys.readouterr().out
    assert "STOPPED at the budget cap" in out
    js = tmp_path / "r.json"
    assert run_cli(cfg, "report", "quiz", "--json", str(js), "--resamples", "20") == 0
    rep = orjson.loads(js.read_bytes())
    # each item costs ~0.00011 USD: the run stops at the first item that finds the cap reached
    assert 0.0005 <= rep["spend"]["total_usd"] < 0.0005 + 0.0002 and rep["results"] < 30
    # spend is cumulative: a second run (even --fresh, which forgets results) stays stopped
    assert run_cli(cfg, "run", "quiz", "--dataset", str(data), "--gateway", gw.url, "--fresh") == 0
    assert "replayed 0 item(s)" in capsys.readouterr().out


def test_offline_respects_the_data_policy(make_gateway: Any, quiz: FakeQuiz, tmp_path: Path, capsys: Any) -> None:
    gw, cfg, _ = setup(make_gateway, quiz, tmp_path, 1)
    # a request that may only reach self-hosted models is not sent to a hosted candidate, nor to the judge
    sensitive = tmp_path / "sensitive.jsonl"
    sensitive.write_text(orjson.dumps({"messages": [{"role": "user", "content": "What is 1 + 1?"}], "reference": "2",
                                       "policy": "self_hosted"}).decode() + "\n")
    before = len(quiz.requests)
    assert run_cli(cfg, "run", "quiz", "--dataset", str(sensitive), "--gateway", gw.url, "--fresh") == 0
    out = capsys.readouterr().out
    assert "1 candidate call(s) skipped by data policy" in out
    # the gateway's router refuses the (hosted) incumbent for this request too: nothing left the building
    assert "1 incumbent failure(s)" in out and quiz.requests[before:] == []
    # it does go to a candidate whose deployment is tagged self_hosted
    models = quiz_models(quiz.url)  # type: ignore[attr-defined]
    models[0]["deployments"][0]["tags"] = ["self_hosted"]
    models[1]["deployments"][0]["tags"] = ["self_hosted"]
    models[2]["deployments"][0]["tags"] = ["self_hosted"]
    gw2 = make_gateway({"models": models, "trials": [trial_def()]})
    cfg.write_text(yaml.safe_dump(gw2.config.model_dump(mode="json", by_alias=True, exclude_none=True)))
    before = len(quiz.requests)
    assert run_cli(cfg, "run", "quiz", "--dataset", str(sensitive), "--gateway", gw2.url) == 0
    assert "0 candidate call(s) skipped by data policy" in capsys.readouterr().out
    assert sorted(r["model"] for r in quiz.requests[before:]) == ["big", "quiz-judge", "quiz-judge", "small"]


def test_costs_from_the_request_log_when_the_trial_has_no_prices(make_gateway: Any, quiz: FakeQuiz, tmp_path: Path,
                                                                 capsys: Any) -> None:
    gw, cfg, data = setup(make_gateway, quiz, tmp_path, 4, prices={}, judge=None)

    def catalog(ctx: Any) -> None:  # stands in for the price catalog, which sets ctx.cost_usd
        ctx.cost_usd = 0.002 if ctx.model == "gpt-big" else 0.0005

    gw.gateway.pre_route.insert(0, catalog)
    assert run_cli(cfg, "run", "quiz", "--dataset", str(data), "--gateway", gw.url) == 0
    assert "(8 call(s) priced from the request log)" in capsys.readouterr().out
    js = tmp_path / "r.json"
    assert run_cli(cfg, "report", "quiz", "--json", str(js), "--resamples", "20") == 0
    rep = orjson.loads(js.read_bytes())
    cost = rep["by_candidate"][0]["cost"]
    assert cost["incumbent_per_1k_usd"] == pytest.approx(2.0) and cost["candidate_per_1k_usd"] == pytest.approx(0.5)
    assert rep["spend"]["total_usd"] == pytest.approx(4 * 0.0025)


def test_savings_projection_counts_real_traffic_not_replays(make_gateway: Any, quiz: FakeQuiz, tmp_path: Path,
                                                            capsys: Any) -> None:
    gw, cfg, data = setup(make_gateway, quiz, tmp_path, 10, judge=None)
    assert run_cli(cfg, "run", "quiz", "--dataset", str(data), "--gateway", gw.url, "--progress") == 0
    err = capsys.readouterr().err
    assert "seeded random order (seed 0)" in err
    assert "10/10 items" in err and "items/s" in err and "$0.0" in err and "numeric diff" in err
    # replays are logged as such, and are not traffic
    rows = gw.log_rows()
    assert rows and {r["trial"] for r in rows} == {"replay:quiz"}
    js = tmp_path / "r.json"

    def projection(*extra: str) -> dict[str, Any]:
        assert run_cli(cfg, "report", "quiz", "--json", str(js), "--resamples", "20", *extra) == 0
        capsys.readouterr()
        return dict(orjson.loads(js.read_bytes())["by_candidate"][0]["cost"]["projection"])

    p = projection()
    assert p["requests_per_month"] is None and "pass --monthly-requests" in p["volume_source"]
    import openai

    c = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0)
    for item in quiz_items(7, seed=9):
        c.chat.completions.create(model="gpt-big", messages=item["messages"])
    gw.flush_logs()
    assert projection()["requests_per_month"] == pytest.approx(7 / 7 * 30)  # 7 real requests in 7 days
    # a --fresh rerun adds replays, not traffic: the projection does not move
    assert run_cli(cfg, "run", "quiz", "--dataset", str(data), "--gateway", gw.url, "--fresh") == 0
    gw.flush_logs()
    assert projection()["requests_per_month"] == pytest.approx(30)
    # --monthly-requests is taken as given, and small volumes still project
    assert projection("--monthly-requests", "1000")["requests_per_month"] == 1000
    small = projection("--monthly-requests", "12")
    assert small["requests_per_month"] == 12 and small["savings_usd"] is not None and small["savings_usd"] > 0
