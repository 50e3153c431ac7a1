"""Bad input gets a 4xx in OpenAI's error shape with a message that says what to fix."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest

from kaiyuan.testing.harness import RunningGateway


async def post(gw: RunningGateway, path: str, data: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    async with aiohttp.ClientSession() as s, s.post(gw.url + path, data=data, headers=h) as r:
        return r.status, await r.json(content_type=None)


def assert_openai_error(body: dict[str, Any], *fragments: str) -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for f in fragments:
        assert f in err["message"], err["message"]


@pytest.mark.parametrize(
    ("path", "payload", "status", "fragment"),
    [
        ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/chat/completions", b"[1,2]", 400, "must be a JSON object"),
        ("/v1/chat/completions", b"", 400, "empty"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}]}', 400, "'model' is required"),
        ("/v1/chat/completions", b'{"model": 5, "messages": []}', 400, "'model' must be a non-empty string"),
        ("/v1/chat/completions", b'{"model": "fake-chat"}', 400, "'messages' is required"),
        ("/v1/chat/completions", b'{"model": "fake-chat", "messages": []}', 400, "at least one message"),
        ("/v1/chat/completions", b'{"model": "fake-chat", "messages": "hi"}', 400, "must be an array"),
        ("/v1/chat/completions", b'{"model": "fake-chat", "messages": [{"role": "wizard", "content": "x"}]}', 400, "messages[0].role"),
        ("/v1/chat/completions", b'{"model": "fake-chat", "messages": [{"role": "user", "content": 5}]}', 400, "messages[0].content"),
        ("/v1/chat/completions", b'{"model": "fake-chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}', 400, "'max_tokens' must be an integer"),
        ("/v1/chat/completions", b'{"model": "fake-chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400, "at least 1"),
        ("/v1/chat/completions", b'{"model": "fake-chat", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', 400, "'stream' must be a boolean"),
        ("/v1/chat/completions", b'{"model": "fake-chat", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400, "'temperature' must be a number"),
        ("/v1/chat/completions", b'{"model": "fake-chat", "messages": [{"role": "user", "content": "x"}], "stop": [1]}', 400, "'stop'"),
        ("/v1/chat/completions", b'{"model": "fake-chat", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}', 400, "tools[0]"),
        ("/v1/chat/completions", b'{"model": "fake-chat", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}}', 400, "response_format.type"),
        ("/v1/chat/completions", b'{"model": "fake-chat", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": 1}}', 400, "include_usage"),
        ("/v1/chat/completions", b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}', 404, "available models: deepseek-reasoner, fake-chat"),
        ("/v1/completions", b'{"model": "fake-chat"}', 400, "'prompt' is required"),
        ("/v1/embeddings", b'{"model": "fake-chat"}', 400, "'input' is required"),
        ("/v1/embeddings", b'{"model": "fake-chat", "input": []}', 400, "non-empty"),
    ],
)
async def test_bad_requests(gateway: RunningGateway, path: str, payload: bytes, status: int, fragment: str) -> None:
    got, body = await post(gateway, path, payload)
    assert got == status
    assert_openai_error(body, fragment)


async def test_unsupported_content_type(gateway: RunningGateway) -> None:
    status, body = await post(gateway, "/v1/chat/completions", b"model=x", {"Content-Type": "text/plain"})
    assert status == 415
    assert_openai_error(body, "Content-Type must be application/json")


async def test_oversized_body(make_gateway, fake_openai) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import openai_model

    gw = make_gateway({"server": {"max_body_bytes": 2000}, "models": [openai_model("m", fake_openai.url)]})
    big = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * 5000 + b'"}]}'
    status, body = await post(gw, "/v1/chat/completions", big)
    assert status == 413
    assert_openai_error(body, "larger than this gateway's limit of 2000 bytes")
    assert fake_openai.requests == []


async def test_unknown_route_and_method(gateway: RunningGateway) -> None:
    status, body = await post(gateway, "/v1/nothing-here", b"{}")
    assert status == 404
    assert_openai_error(body, "no such endpoint")
    async with aiohttp.ClientSession() as s, s.get(gateway.url + "/v1/chat/completions") as r:
        assert r.status == 405
        assert_openai_error(await r.json(), "GET is not allowed")


def test_sdk_sees_typed_errors(gateway: RunningGateway) -> None:
    c = openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="fake-chat", messages=[])


async def test_master_key_required_when_configured(make_gateway, fake_openai) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import openai_model

    gw = make_gateway({"server": {"master_key": "sk-master"}, "models": [openai_model("m", fake_openai.url)]})
    body = b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}'
    status, err = await post(gw, "/v1/chat/completions", body)
    assert status == 401
    assert_openai_error(err, "missing API key")
    status, err = await post(gw, "/v1/chat/completions", body, {"Authorization": "Bearer wrong"})
    assert status == 401 and err["error"]["code"] == "invalid_api_key"
    status, ok = await post(gw, "/v1/chat/completions", body, {"Authorization": "Bearer sk-master"})
    assert status == 200 and ok["choices"][0]["message"]["content"] == "echo: x"
