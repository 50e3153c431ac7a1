"""What Claude Code sends to /v1/messages with its defaults, through Kaiyuan to each kind of upstream:
context_management edits, mid-conversation system messages, adaptive thinking, max_tokens beyond
the model's limit, and a wrong key (issue 10)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import httpx
import pytest

from kaiyuan.dialects import canonical as c
from kaiyuan.dialects import context_edits
from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.conftest import openai_model

CLAUDE_CODE_CM = {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}
MASTER = "sk-master-test"


def client(gw: RunningGateway, key: str = "unused", retries: int = 0) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=retries, timeout=30.0)


@pytest.fixture
def agents_gateway(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI,
                   fake_anthropic: Any, fake_gemini: Any) -> RunningGateway:
    """``oa`` (OpenAI-compatible, output limit 8192 from config), ``ds`` (deepseek-chat: the catalog's
    limit), ``claude`` (Anthropic, limit 16000), ``claude-old`` (no mid-conversation system) and ``gemini``."""
    return make_gateway({"models": [
        openai_model("oa", fake_openai.url, "up-chat", deployment={"max_output_tokens": 8192}),  # type: ignore[attr-defined]
        openai_model("ds", fake_openai.url, "deepseek-chat"),  # type: ignore[attr-defined]
        {"name": "claude", "deployments": [{"provider": "anthropic", "base_url": fake_anthropic.url, "model": "claude-up",
                                            "api_key": "sk-ant-upstream", "max_output_tokens": 16000}]},
        {"name": "claude-old", "deployments": [{"provider": "anthropic", "base_url": fake_anthropic.url, "model": "claude-up",
                                                "api_key": "sk-ant-upstream", "mid_conversation_system": False,
                                                "id": "claude-old-dep"}]},
        {"name": "gemini", "deployments": [{"provider": "gemini", "base_url": fake_gemini.url + "/v1beta", "model": "gemini-up",
                                            "api_key": "gm-upstream", "max_output_tokens": 65536}]},
    ]})


def test_context_management_from_claude_code_is_accepted_everywhere(agents_gateway: RunningGateway, fake_anthropic: Any) -> None:
    for model in ("oa", "gemini", "claude"):
        r = client(agents_gateway).messages.create(
            model=model, max_tokens=100, messages=[{"role": "user", "content": "hi"}],
            thinking={"type": "enabled", "budget_tokens": 1024}, extra_body={"context_management": CLAUDE_CODE_CM})
        assert r.content[-1].type == "text", model
    assert fake_anthropic.requests[-1]["context_management"] == CLAUDE_CODE_CM  # Anthropic applies it itself


def _history() -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "start"}]
    for i in range(3):
        msgs.append({"role": "assistant", "content": [
            {"type": "thinking", "thinking": f"thought {i}", "signature": f"sig{i}"},
            {"type": "tool_use", "id": f"t{i}", "name": "search", "input": {"q": i}}]})
        msgs.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"t{i}", "content": f"result {i}"}]})
    return msgs


TOOLS: Any = [{"name": "search", "input_schema": {"type": "object", "properties": {"q": {"type": "integer"}}}}]


def test_context_edits_change_what_a_translated_upstream_sees(agents_gateway: RunningGateway, fake_openai: FakeOpenAI) -> None:
    cm = {"edits": [{"type": "clear_thinking_20251015", "keep": {"type": "thinking_turns", "value": 1}},
                    {"type": "clear_tool_uses_20250919", "trigger": {"type": "tool_uses", "value": 2},
                     "keep": {"type": "tool_uses", "value": 1}, "clear_tool_inputs": True}]}
    client(agents_gateway).messages.create(model="oa", max_tokens=50, messages=_history(), tools=TOOLS,  # type: ignore[arg-type]
                                           extra_body={"context_management": cm})
    sent = fake_openai.requests[-1]["messages"]
    assistants = [m for m in sent if m["role"] == "assistant"]
    assert [m.get("reasoning_content") for m in assistants] == [None, None, "thought 2"]
    assert [m["tool_calls"][0]["function"]["arguments"] for m in assistants] == ["{}", "{}", '{"q":2}']
    tools = [m["content"] for m in sent if m["role"] == "tool"]
    assert tools == [context_edits.CLEARED, context_edits.CLEARED, "result 2"]


def test_context_edits_below_the_trigger_change_nothing(agents_gateway: RunningGateway, fake_openai: FakeOpenAI) -> None:
    cm = {"edits": [{"type": "clear_tool_uses_20250919"}]}  # default trigger: 100k input tokens
    client(agents_gateway).messages.create(model="oa", max_tokens=50, messages=_history(), tools=TOOLS,  # type: ignore[arg-type]
                                           extra_body={"context_management": cm})
    assert [m["content"] for m in fake_openai.requests[-1]["messages"] if m["role"] == "tool"] == ["result 0", "result 1", "result 2"]


@pytest.mark.parametrize(("cm", "where"), [
    ("clear", "context_management"),
    ({"edits": [{"type": "clear_everything"}]}, "context_management.edits.0.type"),
    ({"edits": [{"type": "clear_thinking_20251015", "keep": {"type": "thinking_turns", "value": 0}}]},
     "context_management.edits.0.keep.value"),
    ({"edits": [{"type": "clear_tool_uses_20250919", "exclude_tools": "Bash"}]}, "context_management.edits.0.exclude_tools"),
])
def test_bad_context_management_is_a_400_naming_the_field(agents_gateway: RunningGateway, cm: Any, where: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as ei:
        client(agents_gateway).messages.create(model="oa", max_tokens=5, messages=[{"role": "user", "content": "x"}],
                                               extra_body={"context_management": cm})
    assert ei.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert ei.value.body["error"]["message"].startswith(where)  # type: ignore[index]


def test_clear_tool_uses_input_token_trigger_is_an_estimate() -> None:
    req = c.Request("m", [c.Message("user", [c.Text("x" * 400)])])
    assert context_edits.estimate_tokens(req) == 100


MID_SYSTEM: Any = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                   {"role": "user", "content": "second"}, {"role": "system", "content": "Be brief."}]


def test_mid_conversation_system_to_each_upstream(agents_gateway: RunningGateway, fake_openai: FakeOpenAI,
                                                  fake_anthropic: Any, fake_gemini: Any) -> None:
    cl = client(agents_gateway)
    cl.messages.create(model="oa", max_tokens=20, system="top", messages=MID_SYSTEM)
    assert fake_openai.requests[-1]["messages"] == [
        {"role": "system", "content": "top"}, {"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second"}, {"role": "system", "content": "Be brief."}]
    cl.messages.create(model="claude", max_tokens=20, messages=MID_SYSTEM)
    assert fake_anthropic.requests[-1]["messages"] == MID_SYSTEM  # supported: passed through
    cl.messages.create(model="claude-old", max_tokens=20, messages=MID_SYSTEM)
    assert fake_anthropic.requests[-1]["messages"][-1] == {
        "role": "user", "content": [{"type": "text", "text": "<system>\nBe brief.\n</system>"}]}
    cl.messages.create(model="gemini", max_tokens=20, messages=MID_SYSTEM)
    contents = fake_gemini.requests[-1]["contents"]
    assert contents[-1] == {"role": "user", "parts": [{"text": "second"}, {"text": "<system>\nBe brief.\n</system>"}]}


@pytest.mark.parametrize(("messages", "where"), [
    ([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}], "messages.0.role"),
    ([{"role": "user", "content": "y"}, {"role": "system", "content": [{"type": "image", "source": {}}]}], "messages.1.content"),
])
def test_bad_system_messages_are_400(agents_gateway: RunningGateway, messages: Any, where: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as ei:
        client(agents_gateway).messages.create(model="oa", max_tokens=5, messages=messages)
    assert ei.value.body["error"]["message"].startswith(where)  # type: ignore[index]


def test_adaptive_thinking_is_not_a_zero_budget(agents_gateway: RunningGateway, fake_gemini: Any, fake_openai: FakeOpenAI) -> None:
    client(agents_gateway).messages.create(model="gemini", max_tokens=100, messages=[{"role": "user", "content": "hi"}],
                                           extra_body={"thinking": {"type": "adaptive"}})
    assert fake_gemini.requests[-1]["generationConfig"]["thinkingConfig"] == {"thinkingBudget": -1, "includeThoughts": True}
    with pytest.raises(anthropic.BadRequestError) as ei:
        client(agents_gateway).messages.create(model="oa", max_tokens=5, messages=[{"role": "user", "content": "x"}],
                                               extra_body={"thinking": {"type": "sometimes"}})
    assert ei.value.body["error"]["message"].startswith("thinking.type")  # type: ignore[index]


def test_max_tokens_is_clamped_to_the_model_limit(agents_gateway: RunningGateway, fake_openai: FakeOpenAI,
                                                  fake_anthropic: Any, fake_gemini: Any) -> None:
    cl = client(agents_gateway)
    hi: Any = [{"role": "user", "content": "hi"}]
    cl.messages.create(model="oa", max_tokens=64000, messages=hi)
    assert fake_openai.requests[-1]["max_tokens"] == 8192  # deployment config
    cl.messages.create(model="ds", max_tokens=32000, messages=hi)
    assert fake_openai.requests[-1]["max_tokens"] == 8192  # the price catalog's deepseek-chat row
    cl.messages.create(model="oa", max_tokens=300, messages=hi)
    assert fake_openai.requests[-1]["max_tokens"] == 300  # below the limit: as asked
    cl.messages.create(model="claude", max_tokens=64000, messages=hi, thinking={"type": "enabled", "budget_tokens": 31999})
    sent = fake_anthropic.requests[-1]
    assert sent["max_tokens"] == 16000 and sent["thinking"] == {"type": "enabled", "budget_tokens": 15999}
    cl.messages.create(model="gemini", max_tokens=100000, messages=hi)
    assert fake_gemini.requests[-1]["generationConfig"]["maxOutputTokens"] == 65536
    oai = httpx.post(agents_gateway.base_url + "/chat/completions",
                     json={"model": "oa", "max_completion_tokens": 50000, "messages": [{"role": "user", "content": "x"}]})
    assert oai.status_code == 200 and fake_openai.requests[-1]["max_completion_tokens"] == 8192


def test_wrong_key_is_a_plain_401_that_invites_no_retry(make_gateway: Callable[[dict[str, Any]], RunningGateway],
                                                       fake_openai: FakeOpenAI) -> None:
    gw = make_gateway({"server": {"master_key": MASTER},
                       "models": [openai_model("oa", fake_openai.url)]})  # type: ignore[attr-defined]
    with pytest.raises(anthropic.AuthenticationError) as ei:
        client(gw, key="sk-wrong", retries=5).messages.create(model="oa", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    err = ei.value
    assert err.status_code == 401 and err.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert "invalid API key" in err.message and "Retrying will not help" in err.message
    assert err.response.headers["x-should-retry"] == "false"
    assert [r["status"] for r in gw.log_rows()] == [401]  # the SDK asked once


@pytest.mark.parametrize(("status", "etype", "exc"), [(401, "authentication_error", anthropic.AuthenticationError),
                                                      (404, "not_found_error", anthropic.NotFoundError),
                                                      (403, "permission_error", anthropic.PermissionDeniedError)])
def test_upstream_error_type_follows_the_status(agents_gateway: RunningGateway, fake_openai: FakeOpenAI,
                                                status: int, etype: str, exc: type) -> None:
    fake_openai.default = Behaviour(status=status, error_type="invalid_request_error")  # what OpenAI itself says
    with pytest.raises(exc) as ei:
        client(agents_gateway).messages.create(model="oa", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert ei.value.status_code == status and ei.value.body["error"]["type"] == etype  # type: ignore[attr-defined]


def test_unknown_routes_show_in_the_log_and_a_bounded_metric(agents_gateway: RunningGateway) -> None:
    long_path = "/v1/" + "x" * 5000
    for method, path in (("POST", "/v1beta/models/m:doesNotExist"), ("GET", long_path), ("DELETE", "/v1/messages"),
                         ("PATCH", "/pot")):
        r = httpx.request(method, agents_gateway.url + path, json={})
        assert r.status_code in (404, 405) and "error" in r.json()
    rows = [r for r in agents_gateway.log_rows() if r["endpoint"] == "unknown"]
    assert [(r["status"], r["error"][:40]) for r in rows] == [
        (404, "unknown route: POST /v1beta/models/m:doe"), (404, "unknown route: GET /v1/xxxxxxxxxxxxxxxxx"),
        (405, "unknown route: DELETE /v1/messages (meth"), (404, "unknown route: PATCH /pot")]
    assert len(rows[1]["error"]) < 300  # the path is truncated
    agents_gateway.gateway.metrics.unknown_route("BREW", 404)  # aiohttp itself refuses such methods; the label is bounded anyway
    text = agents_gateway.gateway.metrics.render().decode()
    assert 'kaiyuan_unknown_route_requests_total{method="POST",status="404"} 1.0' in text
    assert 'kaiyuan_unknown_route_requests_total{method="OTHER",status="404"} 1.0' in text
    assert "xxxx" not in text and "/pot" not in text
