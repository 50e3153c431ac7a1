"""Multi-turn agent traces: an offline trial replays whole conversations through a real gateway,
feeding the recorded tool results back, and scores the final outcome - with the trace's bad inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from kaiyuan.cli import main
from kaiyuan.testing.fake_openai import FakeOpenAI
from kaiyuan.trials.agent import Trace, TraceError, parse_trace, replay
from kaiyuan.trials.evaluate import CallOutcome
from kaiyuan.trials.scorers import Answer
from tests.conftest import openai_model

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


def item(iid: str, question: str, results: list[dict[str, Any]], reference: str, **trace: Any) -> dict[str, Any]:
    return {"id": iid, "request": {"messages": [{"role": "user", "content": question}], "tools": TOOLS},
            "trace": {"tool_results": results, **trace}, "reference": reference}


def test_traces_are_validated() -> None:
    assert parse_trace({"tool_results": []}).max_turns == 8
    for bad, msg in (("x", "JSON object"), ({"tool_results": [{"content": 1}]}, "tool_results"),
                     ({"tool_results": "no"}, "tool_results"), ({"max_turns": 0}, "max_turns"),
                     ({"max_turns": True}, "max_turns"), ({"max_turns": 99}, "max_turns")):
        with pytest.raises(TraceError, match=msg):
            parse_trace(bad)


async def test_replay_feeds_recorded_results_once_and_stops_at_the_turn_limit() -> None:
    seen: list[list[dict[str, Any]]] = []

    async def agent(req: dict[str, Any]) -> CallOutcome:  # calls lookup until told "done"
        msgs = req["messages"]
        seen.append(msgs)
        last = msgs[-1]
        if last["role"] == "tool" and "done" in last["content"]:
            return CallOutcome(Answer("final: " + last["content"]), ms=2.0, prompt_tokens=5, completion_tokens=1)
        return CallOutcome(Answer("", [{"name": "lookup", "arguments": '{"q": 1}'}]), ms=1.0, prompt_tokens=3,
                           completion_tokens=2)

    trace = Trace([{"name": "lookup", "arguments": {"q": 1}, "content": "first"},
                   {"name": "lookup", "content": {"status": "done"}}], 5)
    out = await replay(agent, {"messages": [{"role": "user", "content": "go"}]}, trace)
    assert out.answer is not None and out.answer.text == 'final: {"status":"done"}'
    assert out.answer.steps == ['lookup({"q": 1}) -> first', 'lookup({"q": 1}) -> {"status":"done"}']
    assert out.ms == 4.0 and out.prompt_tokens == 11 and out.completion_tokens == 5
    assert [m["role"] for m in seen[-1]] == ["user", "assistant", "tool", "assistant", "tool"]
    assert seen[-1][1]["tool_calls"][0]["id"] == seen[-1][2]["tool_call_id"]
    # no recorded result left: the tool "fails" and the conversation goes on, up to max_turns
    out = await replay(agent, {"messages": [{"role": "user", "content": "go"}]}, Trace([], 3))
    assert out.answer is not None and out.answer.tool_calls and len(seen[-1]) == 5  # 3 calls: user + 2 x (call, result)
    assert len(out.answer.steps) == 3 and out.answer.steps[-1] == "[stopped after 3 turns]"
    assert "no recorded result for lookup" in out.answer.steps[0]

    async def broken(req: dict[str, Any]) -> CallOutcome:
        return CallOutcome(error="HTTP 500: boom", ms=1.0)

    out = await replay(broken, {"messages": []}, trace)
    assert out.answer is None and out.error == "turn 1: HTTP 500: boom"


def test_offline_trial_scores_the_final_outcome_of_each_conversation(make_gateway: Any, fake_openai: FakeOpenAI,
                                                                      tmp_path: Path, capsys: Any) -> None:
    trial = {"name": "agents", "mode": "offline", "incumbent": "gpt-big", "candidates": ["qwen-small"],
             "scorers": [{"type": "exact"}], "prices": {"gpt-big": {"input_per_mtok": 10, "output_per_mtok": 30},
                                                      "qwen-small": {"input_per_mtok": 1, "output_per_mtok": 2}}}
    gw = make_gateway({"models": [openai_model("gpt-big", fake_openai.url, "big"),  # type: ignore[attr-defined]
                                  openai_model("qwen-small", fake_openai.url, "small")], "trials": [trial]})  # type: ignore[attr-defined]
    cfg = tmp_path / "k.yaml"
    cfg.write_text(yaml.safe_dump(gw.config.model_dump(mode="json", by_alias=True, exclude_none=True)))
    data = tmp_path / "traces.jsonl"
    rows = [
        # the fake agent calls lookup({"query": question, "n": 0}) and then reports what the tool said
        item("paris", "capital of France", [{"name": "lookup", "arguments": {"query": "capital of France", "n": 0},
                                             "content": "Paris"}], "tool said: Paris"),
        item("missing", "capital of Peru", [{"name": "lookup", "arguments": {"query": "somewhere else", "n": 0},
                                             "content": "Lima"}], "tool said: Lima"),
        item("cut", "capital of Chad", [], "tool said: N'Djamena", max_turns=1),
    ]
    data.write_bytes(b"\n".join(orjson.dumps(r) for r in rows) + b"\n")
    before = len(fake_openai.requests)
    assert main(["trial", "run", "agents", "--config", str(cfg), "--dataset", str(data), "--gateway", gw.url]) == 0
    assert "replayed 3 item(s): 3 pair(s), 0 candidate failure(s)" in capsys.readouterr().out
    assert len(fake_openai.requests) - before == 2 * (2 + 2 + 1)  # whole conversations, both arms
    assert gw.gateway.engine is not None
    from kaiyuan.trials.store import TrialStore

    res = {r["item"]: r for r in TrialStore(gw.gateway.engine).results("agents")}
    score = {k: orjson.loads(r["scores"])["exact"] for k, r in res.items()}
    assert score["paris"] == {"incumbent": 1.0, "candidate": 1.0}  # the final answer, not the first tool call
    assert score["missing"] == {"incumbent": 0.0, "candidate": 0.0}  # the tool "failed": no recorded result
    assert score["cut"] == {"incumbent": 0.0, "candidate": 0.0}
    assert "lookup(" in res["paris"]["candidate_answer"] and "-> Paris" in res["paris"]["candidate_answer"]
    assert "[stopped after 1 turns]" in res["cut"]["incumbent_answer"]
    assert res["paris"]["candidate_cost"] is not None and res["paris"]["candidate_cost"] > 0  # summed over the turns
    # a bad trace fails the load, naming the line
    data.write_text(orjson.dumps(item("x", "q", [], "r", max_turns=0)).decode() + "\n")
    assert main(["trial", "run", "agents", "--config", str(cfg), "--dataset", str(data), "--gateway", gw.url]) == 2
    assert "traces.jsonl:1: 'trace.max_turns' must be an integer" in capsys.readouterr().err
