"""Four limits can make an answer "too large", and the caller must be able to tell which one it hit
(docs/robustness.md): the gateway's own request limit (``server.max_body_bytes``, 413), the
upstream's reply (``max_response_bytes``, 502), the upstream's stream (``max_stream_bytes``, an error
event), and the upstream refusing the request as too large (its own 413, passed on). Each says so in
its message (naming the setting, or the upstream) and, in the OpenAI dialect, in its ``code``; in
the Anthropic dialect, which has no code, in its message and type."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from kaiyuan.testing.harness import RunningGateway
from tests.conftest import openai_model
from tests.http import http
from tests.test_upstream_garbage import RawUpstream, Reply, raw  # noqa: F401  (fixture)

BODY_LIMIT, REPLY_LIMIT, STREAM_LIMIT = 4096, 4096, 8192
MASTER = "sk-master-too-large-0123456789"
BIG_REPLY = b'{"id": "' + b"x" * 10_000 + b'"}'
OPENAI_EVENT = (b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"up","choices":'
                b'[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}\n\n')
ANTHROPIC_START = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message",'
                   b'"role":"assistant","model":"claude-up","content":[],"stop_reason":null,"stop_sequence":null,'
                   b'"usage":{"input_tokens":5,"output_tokens":1}}}\n\n')
PING = b'event: ping\ndata: {"type": "ping"}\n\n'
UPSTREAM_413 = b'{"type": "error", "error": {"type": "request_too_large", "message": "Request exceeds the maximum size"}}'


@pytest.fixture
def gw(make_gateway: Callable[[dict[str, Any]], RunningGateway], raw: RawUpstream) -> RunningGateway:  # noqa: F811
    one = {"retries": {"max_attempts": 1}}
    limits = {"max_response_bytes": REPLY_LIMIT, "max_stream_bytes": STREAM_LIMIT}
    return make_gateway({"server": {"max_body_bytes": BODY_LIMIT, "master_key": MASTER}, "models": [
        openai_model("m", raw.url, "up", routing=one, deployment=limits),
        {"name": "claude", "routing": one, "deployments": [
            {"provider": "anthropic", "base_url": raw.url, "model": "claude-up", "api_key": "k", **limits}]},
    ]})


def _error(gw: RunningGateway, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """(status, error object) of a whole error answer, or of the error event that ended a stream."""
    r = http("POST", gw.url + path, body, MASTER)
    if r.status_code != 200:
        return r.status_code, r.json()["error"]
    events = [json.loads(line[5:]) for line in r.text.split("\n") if line.startswith("data:") and "error" in line]
    assert events, r.text
    return 200, events[-1]["error"]


def _cases(raw: RawUpstream, dialect: str) -> dict[str, Callable[[], Reply | None]]:  # noqa: F811
    stream = [OPENAI_EVENT] * 200 if dialect == "openai" else [ANTHROPIC_START] + [PING] * 400
    return {
        "request": lambda: None,  # the gateway refuses it: no upstream call
        "reply": lambda: Reply(chunks=[BIG_REPLY]),
        "stream": lambda: Reply(chunks=stream, stream=True),
        "upstream 413": lambda: Reply(status=413, chunks=[UPSTREAM_413]),
    }


def _body(dialect: str, case: str) -> tuple[str, dict[str, Any]]:
    text = "x" * (BODY_LIMIT + 100) if case == "request" else "hi"
    msgs = [{"role": "user", "content": text}]
    stream = case == "stream"
    if dialect == "openai":
        return "/v1/chat/completions", {"model": "m", "messages": msgs, "stream": stream}
    return "/v1/messages", {"model": "claude", "max_tokens": 50, "messages": msgs, "stream": stream}


SAYS = {"request": "server.max_body_bytes", "reply": "max_response_bytes", "stream": "max_stream_bytes",
        "upstream 413": "returned 413: Request exceeds the maximum size"}
OPENAI_CODES = {"request": "request_too_large", "reply": "upstream_reply_too_large",
                "stream": "upstream_stream_too_large", "upstream 413": "upstream_request_too_large"}


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_each_too_large_error_says_which_limit(gw: RunningGateway, raw: RawUpstream, dialect: str) -> None:  # noqa: F811
    seen: dict[str, tuple[int, str, str]] = {}
    for case, reply in _cases(raw, dialect).items():
        r = reply()
        if r is not None:
            raw.script.append(r)
        path, body = _body(dialect, case)
        status, err = _error(gw, path, body)
        message = err["message"]
        assert SAYS[case] in message and (case != "upstream 413" or message.startswith("upstream ")), (case, message)
        if dialect == "openai":
            assert err["code"] == OPENAI_CODES[case], (case, err)
            seen[case] = (status, err["code"], message)
        else:
            seen[case] = (status, err["type"], message)
    assert seen["request"][0] == 413 and seen["upstream 413"][0] == 413
    assert seen["reply"][0] == 502
    # no two alike: the code (OpenAI) or the message (both) tells them apart
    assert len({s[1:] for s in seen.values()}) == 4
    others = [s[2] for c, s in seen.items() if c != "request"]
    assert not any("max_body_bytes" in m for m in others), others


def test_an_admin_body_over_the_limit_names_it(gw: RunningGateway) -> None:
    """aiohttp's own body limit (the admin and trials APIs read through it) says the same as the API routes'."""
    r = http("POST", gw.url + "/admin/keys", {"name": "k", "pad": "x" * (2 * BODY_LIMIT)}, MASTER)
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and f"limit of {BODY_LIMIT} bytes (server.max_body_bytes)" in err["message"]
