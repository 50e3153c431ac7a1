"""Shared fixtures: real servers on 127.0.0.1 (fake upstreams and the gateway) in a background loop."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kaiyuan.testing.fake_openai import FakeOpenAI
from kaiyuan.testing.harness import RunningGateway, start_gateway
from kaiyuan.testing.server_thread import ServerThread

logging.getLogger("alembic").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def servers() -> Iterator[ServerThread]:
    st = ServerThread()
    yield st
    st.close()


@pytest.fixture
def fake_openai(servers: ServerThread) -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI(api_key="sk-upstream")
    fake.url = servers.serve(fake.app)  # type: ignore[attr-defined]
    yield fake
    servers.stop(fake.app)


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
