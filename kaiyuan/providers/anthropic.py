"""Anthropic's native Messages API: POST {base_url}/v1/messages with x-api-key and anthropic-version."""

from __future__ import annotations

from typing import ClassVar

from kaiyuan.config import AnthropicDeployment, credential_headers, upstream_url
from kaiyuan.providers.base import UpstreamCall
from kaiyuan.providers.http import PooledHTTPProvider

ENDPOINT_PATHS = {"messages": "/v1/messages", "count_tokens": "/v1/messages/count_tokens"}


class AnthropicProvider(PooledHTTPProvider):
    protocol: ClassVar[str] = "anthropic"

    def __init__(self, deployment: AnthropicDeployment) -> None:
        super().__init__(deployment)
        h = {"Content-Type": "application/json", "Accept": "application/json",
             "anthropic-version": deployment.anthropic_version, **credential_headers(deployment.base_url),
             **deployment.headers}
        if deployment.api_key:
            h["x-api-key"] = deployment.api_key
        self._headers = h
        self._stream_headers = {**h, "Accept": "text/event-stream"}
        self._urls = {k: upstream_url(deployment.base_url, p) for k, p in ENDPOINT_PATHS.items()}

    def target(self, call: UpstreamCall) -> tuple[str, dict[str, str]]:
        url = self._urls.get(call.endpoint) or self._urls["messages"]
        return url, self._stream_headers if call.stream else self._headers
