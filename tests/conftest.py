"""Shared fixtures: real servers on 127.0.0.1 (fake upstreams and the gateway) in a background loop."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kaiyuan.testing.fake_openai import FakeOpenAI
from kaiyuan.testing.harness import RunningGateway, start_gateway
from kaiyuan.testing.server_thread import ServerThread
from tests.services import PrivateRedis

logging.getLogger("alembic").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def servers() -> Iterator[ServerThread]:
    st = ServerThread()
    yield st
    st.close()


def _served(servers: ServerThread, fake: Any) -> Iterator[Any]:
    """Serve a fake upstream on 127.0.0.1 for one test; its base URL is ``fake.url``."""
    fake.url = servers.serve(fake.app)
    yield fake
    servers.stop(fake.app)


@pytest.fixture
def fake_openai(servers: ServerThread) -> Iterator[FakeOpenAI]:
    yield from _served(servers, FakeOpenAI(api_key="sk-upstream"))


def openai_model(name: str, url: str, upstream_model: str | None = None, **extra: Any) -> dict[str, Any]:
    dep = {"provider": "openai_compatible", "base_url": url + "/v1", "model": upstream_model or name, "api_key": "sk-upstream"}
    dep.update(extra.pop("deployment", {}))
    return {"name": name, "deployments": [dep], **extra}


@pytest.fixture
def make_gateway(servers: ServerThread, tmp_path: Any) -> Iterator[Callable[[dict[str, Any]], RunningGateway]]:
    started: list[RunningGateway] = []
    counter = [0]

    def make(config: dict[str, Any]) -> RunningGateway:
        counter[0] += 1
        gw = start_gateway(servers, config, f"sqlite:///{tmp_path}/kaiyuan{counter[0]}.db")
        started.append(gw)
        return gw

    yield make
    for g in started:
        _stop_gateway(servers, g)


def _stop_gateway(servers: ServerThread, g: RunningGateway) -> None:
    for r in list(servers._runners):
        from kaiyuan.server.openai_api import GATEWAY_KEY

        if r.app is not None and r.app.get(GATEWAY_KEY) is g.gateway:
            servers.call(r.cleanup())
            servers._runners.remove(r)


@pytest.fixture
def gateway(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI) -> RunningGateway:
    """A gateway with two models on the fake upstream: ``fake-chat`` and ``deepseek-reasoner``."""
    url = fake_openai.url  # type: ignore[attr-defined]
    return make_gateway(
        {
            "models": [
                openai_model("fake-chat", url, "upstream-chat", log_bodies=True),
                openai_model("deepseek-reasoner", url),
            ]
        }
    )


# -- native vendor upstreams (issue 3: dialects) ----------------------------------------------------
@pytest.fixture
def fake_anthropic(servers: ServerThread) -> Iterator[Any]:
    from kaiyuan.testing.fake_anthropic import FakeAnthropic

    yield from _served(servers, FakeAnthropic(api_key="sk-ant-upstream"))


@pytest.fixture
def fake_gemini(servers: ServerThread) -> Iterator[Any]:
    from kaiyuan.testing.fake_gemini import FakeGemini

    yield from _served(servers, FakeGemini(api_key="gm-upstream"))


@pytest.fixture
def native_gateway(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_anthropic: Any, fake_gemini: Any) -> RunningGateway:
    """``claude`` on the fake Anthropic API and ``gemini`` on the fake Gemini API."""
    return make_gateway({"models": [
        {"name": "claude", "log_bodies": True, "deployments": [
            {"provider": "anthropic", "base_url": fake_anthropic.url, "model": "claude-up", "api_key": "sk-ant-upstream"}]},
        {"name": "gemini", "deployments": [
            {"provider": "gemini", "base_url": fake_gemini.url + "/v1beta", "model": "gemini-up", "api_key": "gm-upstream"}]},
    ]})


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A private redis-server of this test's own (tests that restart, pause or empty it)."""
    r = PrivateRedis(tmp_path)
    r.start()
    yield r
    r.stop()
