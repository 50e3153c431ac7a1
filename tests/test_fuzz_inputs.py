"""Whatever a client sends, the gateway answers a clear 4xx in the caller's dialect (or the right
answer), never a 500, a stack trace or a hang, and stays healthy.

Bodies are valid requests mutated at one random path (wrong types at every level, deep nesting,
huge numbers, unicode, nulls), plus wholly random JSON. They go to a pass-through model and to
models on Anthropic and Gemini upstreams (the translation paths).
"""

from __future__ import annotations

import copy
import http.client
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaiyuan.testing.harness import RunningGateway
from tests.conftest import openai_model

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64 + 1, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([1e308, -1e308, 5e-324, 0.5]),
    st.text(max_size=20), st.sampled_from(["", "\x00", "\u202e\ufeff", "🦀" * 50, "a" * 5000, "user", "assistant",
                                           "text", "image", "tool_use", "tool_result", "function", "json_schema"]),
)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=12)


def _deep(n: int) -> Any:
    v: Any = "x"
    for i in range(n):
        v = [v] if i % 2 else {"a": v}
    return v


WEIRD = st.one_of(JSON, st.sampled_from([_deep(40), _deep(200), {"type": "text"}, {"type": None}, [None], [{}], [[]]]))

OPENAI_CHAT = {
    "model": "M", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        {"role": "assistant", "content": None, "reasoning_content": "r",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ],
    "tools": [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}],
    "tool_choice": {"type": "function", "function": {"name": "f"}},
    "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}},
    "max_tokens": 5, "temperature": 0.5, "stop": ["x"], "n": 1, "seed": 1, "stream": False,
    "stream_options": {"include_usage": True}, "logprobs": False,
}
OPENAI_COMPLETIONS = {"model": "M", "prompt": "hello", "max_tokens": 5, "stream": False, "stop": "\n"}
OPENAI_EMBEDDINGS = {"model": "M", "input": ["a", "b"], "encoding_format": "float", "dimensions": 8}
ANTHROPIC_MESSAGES = {
    "model": "M", "max_tokens": 16, "system": [{"type": "text", "text": "be brief"}],
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "s"},
                                          {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "ok"}]}]},
    ],
    "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
    "tool_choice": {"type": "auto"}, "stop_sequences": ["x"], "metadata": {"user_id": "u"}, "stream": False,
    "thinking": {"type": "enabled", "budget_tokens": 1024}, "temperature": 0.5,
}


def _paths(v: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(v, dict):
        for k, x in v.items():
            out += _paths(x, (*prefix, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            out += _paths(x, (*prefix, i))
    return out


def _set(body: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    cur = body
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return body


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any], models: list[str]) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return copy.deepcopy(draw(WEIRD))  # anything at all, even not an object
    body = copy.deepcopy(base)
    body["model"] = draw(st.sampled_from(models))
    if "stream" in body:
        body["stream"] = draw(st.booleans())
    for _ in range(draw(st.integers(1, 2))):
        paths = [p for p in _paths(body) if p and p != ("model",)]
        path = draw(st.sampled_from(paths))
        action = draw(st.integers(0, 3))
        if action == 0 and isinstance(path[-1], str):  # drop a key
            parent = body
            for p in path[:-1]:
                parent = parent[p]
            parent.pop(path[-1], None)
        else:
            body = _set(body, path, copy.deepcopy(draw(WEIRD)))
        if not isinstance(body, dict):
            break
    return body


def openai_error_shape(data: Any) -> bool:
    e = data.get("error") if isinstance(data, dict) else None
    return isinstance(e, dict) and isinstance(e.get("message"), str) and {"type", "param", "code"} <= e.keys()


def anthropic_error_shape(data: Any) -> bool:
    e = data.get("error") if isinstance(data, dict) else None
    return (isinstance(data, dict) and data.get("type") == "error" and isinstance(e, dict)
            and isinstance(e.get("type"), str) and isinstance(e.get("message"), str))


@pytest.fixture
def fuzz_gateway(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: Any, fake_anthropic: Any,
                 fake_gemini: Any) -> RunningGateway:
    return make_gateway({"models": [
        openai_model("plain", fake_openai.url, "upstream-chat", routing={"retries": {"max_attempts": 1}}),
        {"name": "claude", "routing": {"retries": {"max_attempts": 1}}, "deployments": [
            {"provider": "anthropic", "base_url": fake_anthropic.url, "model": "claude-up", "api_key": "sk-ant-upstream"}]},
        {"name": "gemini", "routing": {"retries": {"max_attempts": 1}}, "deployments": [
            {"provider": "gemini", "base_url": fake_gemini.url + "/v1beta", "model": "gemini-up", "api_key": "gm-upstream"}]},
    ]})


def _post(gw: RunningGateway, path: str, raw: bytes, method: str = "POST") -> tuple[int, str, bytes]:
    u = urlsplit(gw.url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=20)  # a hang fails the test
    try:
        conn.request(method, path, body=raw if method == "POST" else None, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type") or "", r.read()
    finally:
        conn.close()


def _check(gw: RunningGateway, path: str, body: Any, shape: Callable[[Any], bool]) -> None:
    raw = json.dumps(body).encode()  # (json: numbers beyond 64 bits too)
    status, ctype, content = _post(gw, path, raw)
    text = content.decode("utf-8", "replace")
    assert "Traceback" not in text and "internal gateway error" not in text, (path, raw[:500], text[:500])
    # >= 500 only when an upstream failed (a fake upstream may choke on garbage the gateway passes through)
    assert status < 500 or "upstream" in text, (path, raw[:500], status, text[:500])
    if ctype.startswith("text/event-stream"):
        assert status == 200
        return
    data = orjson.loads(content)
    if status >= 400:
        assert shape(data), (path, raw[:500], text[:500])


def _run(gw: RunningGateway, path: str, base: dict[str, Any], models: list[str], shape: Callable[[Any], bool]) -> None:
    @SETTINGS
    @given(body=mutated(base, models))
    def fuzz(body: Any) -> None:
        _check(gw, path, body, shape)

    fuzz()
    assert _post(gw, "/healthz", b"", "GET")[0] == 200
    status, _, content = _post(gw, path, orjson.dumps({**base, "model": models[0], "stream": False}))
    assert status < 500, content


def test_fuzz_chat_completions(fuzz_gateway: RunningGateway) -> None:
    _run(fuzz_gateway, "/v1/chat/completions", OPENAI_CHAT, ["plain", "claude", "gemini", "nope"], openai_error_shape)


def test_fuzz_completions(fuzz_gateway: RunningGateway) -> None:
    _run(fuzz_gateway, "/v1/completions", OPENAI_COMPLETIONS, ["plain", "claude"], openai_error_shape)


def test_fuzz_embeddings(fuzz_gateway: RunningGateway) -> None:
    _run(fuzz_gateway, "/v1/embeddings", OPENAI_EMBEDDINGS, ["plain", "gemini"], openai_error_shape)


def test_fuzz_messages(fuzz_gateway: RunningGateway) -> None:
    _run(fuzz_gateway, "/v1/messages", ANTHROPIC_MESSAGES, ["claude", "plain", "gemini", "nope"], anthropic_error_shape)


def test_fuzz_count_tokens(fuzz_gateway: RunningGateway) -> None:
    base = {k: v for k, v in ANTHROPIC_MESSAGES.items() if k not in ("max_tokens", "stream")}
    _run(fuzz_gateway, "/v1/messages/count_tokens", base, ["plain", "claude", "gemini"], anthropic_error_shape)


# -- the cases the fuzzer found, pinned -------------------------------------------------------------
def _mut(base: dict[str, Any], model: str, path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    return _set({**copy.deepcopy(base), "model": model}, path, value)


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", _mut(OPENAI_CHAT, "plain", ("messages", 0, "role"), ["system"]), "messages[0].role"),
    ("/v1/messages", _mut(ANTHROPIC_MESSAGES, "claude", ("messages", 0, "content", 0, "type"), {"a": 1}), None),
    ("/v1/messages", _mut(ANTHROPIC_MESSAGES, "claude", ("messages", 2, "content", 0, "tool_use_id"), ["t1"]), None),
    ("/v1/messages", _mut(ANTHROPIC_MESSAGES, "plain", ("thinking", "budget_tokens"), "lots"), None),
    ("/v1/messages", _mut(ANTHROPIC_MESSAGES, "gemini", ("messages", 0, "content", 1, "source"), ["x"]), None),
    ("/v1/messages", _mut(ANTHROPIC_MESSAGES, "plain", ("output_config",), ["x"]), None),
    ("/v1/messages/count_tokens", _mut(ANTHROPIC_MESSAGES, "plain", ("messages", 1, "content", 0, "thinking"), [1]), None),
    ("/v1/messages/count_tokens", _mut(ANTHROPIC_MESSAGES, "plain", ("messages", 1, "content", 1, "name"), 5), None),
    ("/v1/messages/count_tokens", _mut(ANTHROPIC_MESSAGES, "plain", ("system",), [{"type": "text", "text": 5}]), None),
])
def test_wrong_shapes_are_400_in_the_callers_dialect(fuzz_gateway: RunningGateway, path: str, body: Any,
                                                      param: str | None) -> None:
    status, _, content = _post(fuzz_gateway, path, orjson.dumps(body))
    assert status == 400, content
    data = orjson.loads(content)
    if path.startswith("/v1/messages"):
        assert anthropic_error_shape(data) and data["error"]["type"] == "invalid_request_error", data
    else:
        assert openai_error_shape(data) and data["error"]["param"] == param, data


@pytest.mark.parametrize(("headers", "raw"), [
    ({"Content-Type": "application/json", "Content-Encoding": "gzip"}, b"not gzip at all"),
    ({"Content-Type": "application/json; charset=utf-16"}, '{"model": "plain"}'.encode("utf-16")),
    ({"Content-Type": "application/json"}, b'\xef\xbb\xbf{"model": "plain", "messages": []}'),
    ({"Content-Type": "application/json"}, b'{"model": "plain", "messages": [{"role": "user", "content": "\\ud800"}]}'),
    ({"Content-Type": "application/json"}, b'{"model": "plain", "max_tokens": 1e400}'),
    ({"Content-Type": "application/json"}, b"[" * 100_000 + b"]" * 100_000),
    ({"Content-Type": "text/plain"}, b"{}"),
    ({"Content-Type": "application/json", "Transfer-Encoding": "chunked"}, None),
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_odd_encodings_and_headers_are_4xx(fuzz_gateway: RunningGateway, headers: dict[str, str], raw: bytes | None,
                                           path: str) -> None:
    u = urlsplit(fuzz_gateway.url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=20)
    try:
        if raw is None:  # a chunked body larger than the limit, sent without a Content-Length
            conn.putrequest("POST", path)
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders()
            big = b'{"model": "plain", "x": "' + b"a" * (fuzz_gateway.config.server.max_body_bytes + 10) + b'"}'
            for i in range(0, len(big), 1 << 20):
                part = big[i:i + (1 << 20)]
                try:
                    conn.send(b"%x\r\n%s\r\n" % (len(part), part))
                except OSError:  # the gateway answered 413 and closed
                    break
            else:
                conn.send(b"0\r\n\r\n")
        else:
            conn.request("POST", path, body=raw, headers=headers)
        r = conn.getresponse()
        status, content = r.status, r.read()
    finally:
        conn.close()
    assert 400 <= status < 500, (status, content[:300])
    data = orjson.loads(content)
    assert (anthropic_error_shape if path == "/v1/messages" else openai_error_shape)(data), data
    assert _post(fuzz_gateway, "/healthz", b"", "GET")[0] == 200


@pytest.mark.parametrize("text", ["say <|endoftext|> and <|im_start|> verbatim", "hello world, " * 100_000])
def test_count_tokens_of_any_text(fuzz_gateway: RunningGateway, text: str) -> None:
    body = {"model": "plain", "messages": [{"role": "user", "content": text}]}
    status, _, content = _post(fuzz_gateway, "/v1/messages/count_tokens", orjson.dumps(body))
    assert status == 200, content[:300]
    assert orjson.loads(content)["input_tokens"] >= len(text) // 20
