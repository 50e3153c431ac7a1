"""Agent SDKs that speak /v1/responses, unchanged but for the base URL, through a real gateway onto
the fake OpenAI-compatible upstream and the fake Anthropic-native upstream: the OpenAI Agents SDK
(its default model, a tool loop, output_type, streamed), LangChain ChatOpenAI(use_responses_api=True)
and pydantic-ai's OpenAIResponsesModel. Each completes a tool-calling episode on both fakes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel

from kaiyuan.testing.harness import RunningGateway
from tests.conftest import openai_model

agents = pytest.importorskip("agents")
UPSTREAMS = ["openai", "anthropic"]


def _default_model() -> str:
    from agents.models import get_default_model

    return str(get_default_model())


@pytest.fixture
def sgw(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: Any, fake_anthropic: Any) -> RunningGateway:
    """Every model twice: ``<name>`` on the OpenAI-compatible fake, ``<name>-anthropic`` on the Anthropic fake."""
    models: list[dict[str, Any]] = []
    for name in ("chat", _default_model()):
        models.append(openai_model(name, fake_openai.url, "upstream-chat"))
        models.append({"name": f"{name}-anthropic", "deployments": [
            {"provider": "anthropic", "base_url": fake_anthropic.url, "model": "claude-up", "api_key": "sk-ant-upstream"}]})
    return make_gateway({"models": models})


def _name(base: str, upstream: str) -> str:
    return base if upstream == "openai" else f"{base}-anthropic"


calls: list[str] = []


def search(query: str, n: int = 0) -> str:
    """Search for something.

    Args:
        query: what to look for
        n: which result
    """
    calls.append(query)
    return "sunny"


# -- openai-agents --------------------------------------------------------------------------------
def _agents_client(gw: RunningGateway) -> None:
    from openai import AsyncOpenAI

    agents.set_default_openai_client(AsyncOpenAI(base_url=gw.base_url, api_key="unused", max_retries=0),
                                     use_for_tracing=False)
    agents.set_default_openai_api("responses")
    agents.set_tracing_disabled(True)


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_agents_default_model_tool_loop(sgw: RunningGateway, upstream: str) -> None:
    _agents_client(sgw)
    calls.clear()
    model = None if upstream == "openai" else _name(_default_model(), upstream)  # None: the SDK's default
    agent = agents.Agent(name="helper", instructions="Use the tool.", tools=[agents.function_tool(search)],
                         **({"model": model} if model else {}))
    result = agents.Runner.run_sync(agent, "weather in Oslo")
    assert calls == ["weather in Oslo"]
    assert result.final_output == "tool said: sunny"


class Answer(BaseModel):
    answer: str


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_agents_output_type(sgw: RunningGateway, upstream: str) -> None:
    _agents_client(sgw)
    agent = agents.Agent(name="typed", instructions="Answer in JSON.", output_type=Answer, model=_name("chat", upstream))
    result = agents.Runner.run_sync(agent, "capital of Norway")
    assert result.final_output == Answer(answer="capital of Norway")


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_agents_streamed_tool_loop(sgw: RunningGateway, upstream: str) -> None:
    _agents_client(sgw)
    calls.clear()
    agent = agents.Agent(name="streamer", instructions="Use the tool.", tools=[agents.function_tool(search)],
                         model=_name("chat", upstream))

    async def run() -> tuple[Any, list[str]]:
        streamed = agents.Runner.run_streamed(agent, "weather in Bergen")
        kinds = [ev.type async for ev in streamed.stream_events()]
        return streamed.final_output, kinds

    final, kinds = asyncio.run(run())
    assert calls == ["weather in Bergen"] and final == "tool said: sunny"
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds


# -- LangChain ------------------------------------------------------------------------------------
@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_langchain_responses_api_tool_episode(sgw: RunningGateway, upstream: str) -> None:
    lc = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage

    llm = lc.ChatOpenAI(model=_name("chat", upstream), base_url=sgw.base_url, api_key="unused",
                        use_responses_api=True, max_retries=0).bind_tools([search])
    history: list[Any] = [HumanMessage("weather in Turku")]
    first = llm.invoke(history)
    assert first.tool_calls and first.tool_calls[0]["name"] == "search"
    assert first.tool_calls[0]["args"]["query"] == "weather in Turku"
    history += [first, ToolMessage("cloudy", tool_call_id=first.tool_calls[0]["id"])]
    second = llm.invoke(history)
    assert second.text == "tool said: cloudy" or "tool said: cloudy" in str(second.content)


# -- pydantic-ai ----------------------------------------------------------------------------------
@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_pydantic_ai_responses_model_tool_episode(sgw: RunningGateway, upstream: str) -> None:
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    calls.clear()
    model = OpenAIResponsesModel(_name("chat", upstream), provider=OpenAIProvider(base_url=sgw.base_url, api_key="unused"))
    agent = Agent(model, tools=[search], instructions="Use the tool.")
    result = agent.run_sync("weather in Tartu")
    assert calls == ["weather in Tartu"]
    assert result.output == "tool said: sunny"
