"""The request path (kaiyuan.pipeline) that every API family shares: whatever the dialect's middle
does (answers, raises a GatewayError, has a bug, is cancelled), the upstream reply it opened is
closed, the in-flight gauge goes back, the request is logged, and errors use the route's dialect."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from aiohttp import web

from kaiyuan import pipeline
from kaiyuan.context import RequestContext, Upstream
from kaiyuan.dialects import anthropic as anth
from kaiyuan.dialects import openai as oai
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.gateway import Gateway
from kaiyuan.providers.base import UpstreamReply
from kaiyuan.server import anthropic_api, app, gemini_api, openai_api
from kaiyuan.testing.harness import RunningGateway
from tests.conftest import openai_model

CLOSED: list[str] = []


async def _middle(request: web.Request, gw: Gateway, ctx: RequestContext, body: dict[str, Any],
                  arg: Any) -> web.StreamResponse:
    async def closer() -> None:
        CLOSED.append(ctx.request_id)

    ctx.upstream = Upstream(gw.providers["m"][0], UpstreamReply(200, {}, body=b"{}", _closer=closer))
    what = body.get("do")
    if what == "gateway_error":
        raise GatewayError(ErrorKind.UPSTREAM_ERROR, "the upstream said no")
    if what == "bug":
        raise ZeroDivisionError("oops")
    ctx.status = 200
    return web.Response(body=orjson.dumps({"arg": arg}), content_type="application/json")


def _routes(a: web.Application) -> None:
    a.router.add_post("/test/openai", pipeline.api_handler("openai", "chat", oai.error_body, oai.validate_chat, _middle, "o"))
    a.router.add_post("/test/anthropic", pipeline.api_handler("anthropic", "messages", anth.error_body, anth.validate,
                                                              _middle, "a"))


@pytest.fixture
def sk(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: Any) -> Iterator[RunningGateway]:
    app.EXTRA_ROUTES.append(_routes)
    try:
        yield make_gateway({"models": [openai_model("m", fake_openai.url)]})
    finally:
        app.EXTRA_ROUTES.remove(_routes)


def _post(g: RunningGateway, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    u = urlsplit(g.url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=20)
    try:
        conn.request("POST", path, body=orjson.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, orjson.loads(r.read())
    finally:
        conn.close()


OPENAI = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("path", "base"), [("/test/openai", OPENAI), ("/test/anthropic", ANTHROPIC)])
@pytest.mark.parametrize(("do", "status"), [("answer", 200), ("gateway_error", 502), ("bug", 500)])
def test_skeleton_always_closes_and_finishes(sk: RunningGateway, path: str, base: dict[str, Any], do: str,
                                             status: int) -> None:
    CLOSED.clear()
    code, data = _post(sk, path, {**base, "do": do})
    assert code == status, data
    if status == 200:
        assert data == {"arg": "o" if path == "/test/openai" else "a"}
    elif path == "/test/openai":
        assert set(data) == {"error"} and "type" in data["error"], data
    else:
        assert data["type"] == "error" and "type" in data["error"], data
    if do == "bug":
        assert "internal gateway error (ZeroDivisionError)" in (data["error"]["message"])
    sk.settle()  # the answer may reach the client before steps 8-9 end
    assert len(CLOSED) == 1  # the reply the middle stored was closed
    rows = sk.log_rows()
    assert rows[-1]["status"] == status and rows[-1]["model"] == "m"
    assert sk.gateway.metrics.in_flight._value.get() == 0


@pytest.mark.parametrize(("path", "body", "shape"), [
    ("/test/openai", {"model": "m"}, "openai"),  # no messages: the route's validator
    ("/test/anthropic", {"model": "m", "messages": []}, "anthropic"),
    ("/test/openai", {**OPENAI, "model": "nope"}, "openai"),  # resolve_model: unknown model
    ("/test/anthropic", {**ANTHROPIC, "model": "nope"}, "anthropic"),
])
def test_skeleton_refuses_before_the_middle_in_the_dialect(sk: RunningGateway, path: str, body: dict[str, Any],
                                                          shape: str) -> None:
    CLOSED.clear()
    code, data = _post(sk, path, body)
    assert code in (400, 404), data
    assert (data["type"] == "error") if shape == "anthropic" else ("type" not in data)
    assert CLOSED == []


def test_every_api_family_uses_the_pipeline() -> None:
    for h, name in [(openai_api.chat_completions, "openai_chat"), (openai_api.completions, "openai_completions"),
                    (openai_api.embeddings, "openai_embeddings"), (anthropic_api.messages, "anthropic_messages"),
                    (anthropic_api.count_tokens, "anthropic_count_tokens"),
                    (gemini_api.generate, "gemini_generate_content"), (gemini_api.count_tokens, "gemini_count_tokens")]:
        assert h.__qualname__ == name
        assert h.__code__ is pipeline.api_handler("x", "y", oai.error_body, oai.validate_chat, _middle).__code__


def test_a_small_answer_reaches_the_client_before_the_bookkeeping(gateway: RunningGateway) -> None:
    """Steps 8-9 (settle, metrics, the request log, completion hooks) run after a whole answer that
    the socket takes at once has gone out: the caller does not wait for them. A completion hook
    blocks the gateway's loop until the client (this thread) has read its whole answer; had the
    answer been sent after the hook, the client could not read it and the hook would give up."""
    client_has_it = threading.Event()
    seen_in_hook: list[bool] = []

    def hook(ctx: RequestContext) -> None:
        if ctx.endpoint == "chat":
            seen_in_hook.append(client_has_it.wait(15))

    gateway.gateway.on_complete.append(hook)
    try:
        u = urlsplit(gateway.url)
        conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=30)
        try:
            body = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}]}
            conn.request("POST", "/v1/chat/completions", body=orjson.dumps(body),
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            data = orjson.loads(r.read())
            client_has_it.set()
        finally:
            conn.close()
        assert r.status == 200 and data["model"] == "fake-chat"
        gateway.settle()
        assert seen_in_hook == [True]
        row = gateway.log_rows()[-1]
        assert row["status"] == 200 and row["model"] == "fake-chat"  # and it was still recorded
    finally:
        gateway.gateway.on_complete.remove(hook)
