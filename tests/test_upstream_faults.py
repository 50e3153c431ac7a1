"""Upstream failures keep their meaning; a broken stream is never a silent truncation."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import openai
import pytest

from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.conftest import openai_model

MSG = [{"role": "user", "content": "hello"}]


def client(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0)


def test_upstream_429_keeps_status_and_retry_after(gateway: RunningGateway, fake_openai: FakeOpenAI) -> None:
    # Retry-After 7 s is longer than routing.retries.max_retry_after_s (5 s): passed back, not waited for.
    fake_openai.next(Behaviour(status=429, headers={"Retry-After": "7"}, error_message="Rate limit reached for requests"))
    with pytest.raises(openai.RateLimitError) as e:
        client(gateway).chat.completions.create(model="fake-chat", messages=MSG)
    assert e.value.response.headers["Retry-After"] == "7"
    assert "Rate limit reached" in e.value.message


@pytest.mark.parametrize(("status", "exc"), [(400, openai.BadRequestError), (401, openai.AuthenticationError),
                                              (500, openai.InternalServerError), (503, openai.APIStatusError)])
def test_upstream_status_is_passed_back(gateway: RunningGateway, fake_openai: FakeOpenAI, status: int, exc: type) -> None:
    # A persistent failure (a one-off 401/5xx is retried away by the router; see tests/test_routing.py).
    fake_openai.default = Behaviour(status=status, error_message=f"upstream says {status}")
    with pytest.raises(exc) as e:
        client(gateway).chat.completions.create(model="fake-chat", messages=MSG)
    assert e.value.status_code == status
    assert f"upstream says {status}" in e.value.message
    rows = gateway.log_rows()
    assert rows[-1]["status"] == status and f"upstream says {status}" in rows[-1]["error"]


def test_unreachable_upstream_is_502(make_gateway) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gw = make_gateway({"models": [openai_model("m", f"http://127.0.0.1:{port}")]})
    with pytest.raises(openai.APIStatusError) as e:
        client(gw).chat.completions.create(model="m", messages=MSG)
    assert e.value.status_code == 502
    assert "cannot connect to upstream" in e.value.message


def test_first_byte_timeout_is_504(make_gateway, fake_openai: FakeOpenAI) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway({"models": [openai_model("m", fake_openai.url, deployment={"timeouts": {"first_byte": 0.3}},
                                               routing={"retries": {"max_attempts": 1}})]})
    fake_openai.next(Behaviour(delay_first_byte=5))
    with pytest.raises(openai.APIStatusError) as e:
        client(gw).chat.completions.create(model="m", messages=MSG)
    assert e.value.status_code == 504
    assert "timeouts.first_byte" in e.value.message


def test_stream_stall_ends_with_error_event(make_gateway, fake_openai: FakeOpenAI) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway({"models": [openai_model("m", fake_openai.url, deployment={"timeouts": {"idle": 0.3}})]})
    fake_openai.next(Behaviour(stall_after_chunks=2))
    got = []
    with pytest.raises(openai.APIError) as e:
        for chunk in client(gw).chat.completions.create(model="m", messages=MSG, stream=True):
            got.append(chunk)
    assert got, "chunks before the stall reach the client"
    assert "mid-stream" in str(e.value)
    assert gw.log_rows()[-1]["status"] == 504


@pytest.mark.parametrize("behaviour", [Behaviour(drop_after_chunks=3), Behaviour(omit_done=True), Behaviour(error_event_after_chunks=2)])
def test_broken_stream_is_not_silent(gateway: RunningGateway, fake_openai: FakeOpenAI, behaviour: Behaviour) -> None:
    fake_openai.next(behaviour)
    with pytest.raises(openai.APIError):
        for _ in client(gateway).chat.completions.create(model="fake-chat", messages=MSG, stream=True):
            pass
    row = gateway.log_rows()[-1]
    assert row["status"] >= 500 and row["error"]


async def test_client_disconnect_cancels_upstream(gateway: RunningGateway, fake_openai: FakeOpenAI) -> None:
    fake_openai.next(Behaviour(chunk_delay=0.2))
    body = {"model": "fake-chat", "messages": [{"role": "user", "content": " ".join(["w"] * 40)}], "stream": True}
    async with aiohttp.ClientSession() as s:
        resp = await s.post(gateway.url + "/v1/chat/completions", json=body)
        assert resp.status == 200
        await resp.content.readany()  # the first chunk arrived: the stream is live
        resp.close()  # the client goes away
    for _ in range(100):
        if fake_openai.cancelled:
            break
        await asyncio.sleep(0.05)
    assert fake_openai.cancelled == 1, "the upstream stream was cancelled"
    for _ in range(100):
        rows = gateway.log_rows()
        if rows and rows[-1]["cancelled"]:
            break
        await asyncio.sleep(0.05)
    assert rows[-1]["cancelled"] and rows[-1]["status"] == 499


async def test_client_disconnect_before_first_byte_cancels_upstream(gateway: RunningGateway, fake_openai: FakeOpenAI) -> None:
    fake_openai.next(Behaviour(delay_first_byte=3))
    body = {"model": "fake-chat", "messages": MSG}
    async with aiohttp.ClientSession() as s:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(s.post(gateway.url + "/v1/chat/completions", json=body), 0.3)
    for _ in range(100):
        rows = gateway.log_rows()
        if rows:
            break
        await asyncio.sleep(0.05)
    assert rows[-1]["cancelled"] and rows[-1]["status"] == 499
