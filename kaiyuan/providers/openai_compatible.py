"""Any upstream that speaks OpenAI's wire format: DeepSeek, Qwen (DashScope compatible mode), Kimi,
GLM, OpenRouter, Together, OpenAI, vLLM, SGLang, Ollama, llama.cpp server."""

from __future__ import annotations

from typing import ClassVar

from kaiyuan.config import OpenAICompatibleDeployment, credential_headers, upstream_url
from kaiyuan.providers.base import UpstreamCall
from kaiyuan.providers.http import PooledHTTPProvider

ENDPOINT_PATHS = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
    "responses": "/responses",
}


class OpenAICompatibleProvider(PooledHTTPProvider):
    protocol: ClassVar[str] = "openai"

    def __init__(self, deployment: OpenAICompatibleDeployment) -> None:
        super().__init__(deployment)
        base = {"Content-Type": "application/json", "Accept": "application/json",
                **credential_headers(deployment.base_url), **deployment.headers}
        if deployment.api_key:
            base["Authorization"] = f"Bearer {deployment.api_key}"
        self._headers = base
        self._stream_headers = {**base, "Accept": "text/event-stream"}
        self._urls = {k: upstream_url(deployment.base_url, p) for k, p in ENDPOINT_PATHS.items()}

    def url(self, endpoint: str) -> str:
        return self._urls.get(endpoint) or upstream_url(self.cfg.base_url, "/" + endpoint.lstrip("/"))

    def target(self, call: UpstreamCall) -> tuple[str, dict[str, str]]:
        return self.url(call.endpoint), self._stream_headers if call.stream else self._headers
