"""Gemini's native API as an inbound dialect: the google-genai SDK through Kaiyuan to an
OpenAI-compatible, an Anthropic and a Gemini upstream (issue 10: Gemini CLI got 404)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from kaiyuan.dialects import canonical as c
from kaiyuan.dialects import gemini_in
from kaiyuan.testing.fake_openai import FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.conftest import openai_model

MASTER = "sk-master-gemini"
RUN = types.FunctionDeclaration(name="run_shell_command", description="run a command", parameters_json_schema={
    "type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]})


@pytest.fixture
def gem_gateway(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI,
                fake_anthropic: Any, fake_gemini: Any) -> RunningGateway:
    return make_gateway({"server": {"master_key": MASTER}, "models": [
        openai_model("oa", fake_openai.url, "up-chat"),  # type: ignore[attr-defined]
        {"name": "claude", "deployments": [{"provider": "anthropic", "base_url": fake_anthropic.url, "model": "claude-up",
                                            "api_key": "sk-ant-upstream"}]},
        {"name": "gem", "deployments": [{"provider": "gemini", "base_url": fake_gemini.url + "/v1beta", "model": "gemini-up",
                                         "api_key": "gm-upstream"}]},
    ]})


def sdk(gw: RunningGateway, key: str = MASTER) -> genai.Client:
    return genai.Client(api_key=key, http_options=types.HttpOptions(base_url=gw.url, retry_options=None))


@pytest.mark.parametrize("model", ["oa", "claude", "gem"])
def test_generate_content(gem_gateway: RunningGateway, model: str) -> None:
    cl = sdk(gem_gateway)
    r = cl.models.generate_content(model=model, contents="hello there",
                                                 config=types.GenerateContentConfig(system_instruction="be nice"))
    assert r.text == "echo: hello there"
    assert r.model_version == model  # the public name the caller sent
    assert r.usage_metadata is not None and r.usage_metadata.prompt_token_count
    row = gem_gateway.log_rows()[-1]
    assert (row["dialect"], row["endpoint"], row["status"], row["model"]) == ("gemini", "generate_content", 200, model)


@pytest.mark.parametrize("model", ["oa", "claude", "gem"])
def test_stream_tool_episode(gem_gateway: RunningGateway, model: str) -> None:
    cl = sdk(gem_gateway)
    cfg = types.GenerateContentConfig(tools=[types.Tool(function_declarations=[RUN])])
    chunks = list(cl.models.generate_content_stream(model=model, contents="list files", config=cfg))
    calls = [p.function_call for ch in chunks for p in (ch.candidates[0].content.parts or [])  # type: ignore[index, union-attr]
             if p.function_call]
    assert len(calls) == 1 and calls[0].name == "run_shell_command" and calls[0].args == {"query": "list files", "n": 0}
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.STOP  # type: ignore[index]
    contents = [types.Content(role="user", parts=[types.Part(text="list files")]),
                types.Content(role="model", parts=[types.Part(function_call=calls[0])]),
                types.Content(role="user", parts=[types.Part(function_response=types.FunctionResponse(
                    id=calls[0].id, name="run_shell_command", response={"output": "a.txt"}))])]
    text = "".join(ch.text or "" for ch in cl.models.generate_content_stream(model=model, contents=contents, config=cfg))
    assert text == "tool said: a.txt"


def test_count_tokens(gem_gateway: RunningGateway) -> None:
    cl = sdk(gem_gateway)
    r = cl.models.count_tokens(model="oa", contents="one two three four")
    assert r.total_tokens and r.total_tokens > 4


def test_key_in_the_query_and_wrong_keys(gem_gateway: RunningGateway) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    ok = httpx.post(f"{gem_gateway.url}/v1beta/models/oa:generateContent?key={MASTER}", json=body)
    assert ok.status_code == 200
    cl = sdk(gem_gateway, key="wrong")
    with pytest.raises(genai_errors.ClientError) as ei:
        cl.models.generate_content(model="oa", contents="x")
    assert ei.value.code == 401 and ei.value.status == "UNAUTHENTICATED" and "invalid API key" in (ei.value.message or "")


@pytest.mark.parametrize(("path", "body", "status", "needle"), [
    ("oa:generateContent", {"contents": []}, 400, "contents"),
    ("oa:generateContent", {"contents": [{"role": "robot", "parts": []}]}, 400, "contents[0].role"),
    ("oa:generateContent", {"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"candidateCount": 2}}, 400,
     "candidateCount"),
    ("oa:generateContent", {"contents": [{"parts": [{"text": "x"}]}], "tools": [{"googleSearch": {}}]}, 400, "googleSearch"),
    ("oa:generateContent", {"contents": [{"parts": [{"functionResponse": {"name": "f", "response": {}}}]}]}, 400,
     "answers no functionCall"),
    ("oa:streamGenerateContent", {"contents": [{"parts": [{"text": "x"}]}]}, 400, "alt=sse"),
    ("nope:generateContent", {"contents": [{"parts": [{"text": "x"}]}]}, 404, "does not exist"),
    ("oa:embedContent", {}, 404, "no such method"),
])
def test_bad_requests_get_google_errors(gem_gateway: RunningGateway, path: str, body: Any, status: int, needle: str) -> None:
    r = httpx.post(f"{gem_gateway.url}/v1beta/models/{path}", json=body, headers={"x-goog-api-key": MASTER})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["code"] == status and err["status"] in ("INVALID_ARGUMENT", "NOT_FOUND") and needle in err["message"]


def test_request_to_canonical_maps_the_fields() -> None:
    body = {"model": "m", "systemInstruction": {"parts": [{"text": "sys"}]},
            "contents": [{"role": "user", "parts": [{"text": "q"}, {"inlineData": {"mimeType": "image/png", "data": "AAA"}}]},
                         {"role": "model", "parts": [{"text": "hmm", "thought": True}, {"functionCall": {"name": "f", "args": {"a": 1}}}]},
                         {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {"output": "ok"}}}]}],
            "tools": [{"functionDeclarations": [{"name": "f", "parameters": {"type": "OBJECT", "properties": {"a": {"type": "INTEGER"}}}}]}],
            "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["f"]}},
            "generationConfig": {"maxOutputTokens": 9, "temperature": 0.5, "stopSequences": ["x"],
                                 "thinkingConfig": {"thinkingBudget": -1}, "responseMimeType": "application/json"}}
    req = gemini_in.request_to_canonical(body)
    assert [t.text for t in req.system] == ["sys"]
    assert isinstance(req.messages[1].content[1], c.ToolCall) and req.messages[1].content[1].arguments == '{"a":1}'
    res = req.messages[2].content[0]
    assert isinstance(res, c.ToolResult) and res.tool_call_id == "call_1_1" and res.content == [c.Text("ok")]
    assert req.tools[0].parameters == {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert req.tool_choice == c.ToolChoice("tool", "f") and req.thinking_budget == c.THINKING_ADAPTIVE
    assert (req.max_tokens, req.temperature, req.stop, req.response_format) == (9, 0.5, ["x"], {"type": "json_object"})
