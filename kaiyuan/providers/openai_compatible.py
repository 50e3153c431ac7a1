"""Any upstream that speaks OpenAI's wire format: DeepSeek, Qwen (DashScope compatible mode), Kimi,
GLM, OpenRouter, Together, OpenAI, vLLM, SGLang, Ollama, llama.cpp server."""

from __future__ import annotations

from typing import ClassVar

import aiohttp
import orjson

from kaiyuan.config import OpenAICompatibleDeployment
from kaiyuan.providers.base import Provider, UpstreamCall, UpstreamReply
from kaiyuan.providers.http import make_session, post_json

ENDPOINT_PATHS = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
}


class OpenAICompatibleProvider(Provider):
    protocol: ClassVar[str] = "openai"

    def __init__(self, deployment: OpenAICompatibleDeployment) -> None:
        super().__init__(deployment)
        self.cfg = deployment
        self._session: aiohttp.ClientSession | None = None
        base = {"Content-Type": "application/json", "Accept": "application/json", **deployment.headers}
        if deployment.api_key:
            base["Authorization"] = f"Bearer {deployment.api_key}"
        self._headers = base
        self._stream_headers = {**base, "Accept": "text/event-stream"}
        self._urls = {k: deployment.base_url + p for k, p in ENDPOINT_PATHS.items()}
        self.label = f"{self.id} ({deployment.base_url})"

    async def start(self) -> None:
        if self._session is None:
            self._session = make_session(self.cfg.max_connections, self.cfg.timeouts)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, endpoint: str) -> str:
        return self._urls.get(endpoint) or self.cfg.base_url + "/" + endpoint.lstrip("/")

    async def send(self, call: UpstreamCall) -> UpstreamReply:
        if self._session is None:
            await self.start()
        assert self._session is not None
        body = call.body_bytes if call.body_bytes is not None else orjson.dumps(call.body)
        headers = self._stream_headers if call.stream else self._headers
        if call.headers:
            headers = {**headers, **call.headers}
        return await post_json(
            self._session, self.url(call.endpoint), body, headers, self.cfg.timeouts, call.stream, self.label
        )
