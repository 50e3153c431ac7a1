"""Anthropic's native Messages API: POST {base_url}/v1/messages with x-api-key and anthropic-version."""

from __future__ import annotations

from typing import ClassVar

from kaiyuan.config import AnthropicDeployment
from kaiyuan.providers.base import UpstreamCall
from kaiyuan.providers.http import PooledHTTPProvider

ENDPOINT_PATHS = {"messages": "/v1/messages", "count_tokens": "/v1/messages/count_tokens"}


class AnthropicProvider(PooledHTTPProvider):
    protocol: ClassVar[str] = "anthropic"

    def __init__(self, deployment: AnthropicDeployment) -> None:
        super().__init__(deployment)
        h = {"Content-Type": "application/json", "Accept": "application/json",
             "anthropic-version": deployment.anthropic_version, **deployment.headers}
        if deployment.api_key:
            h["x-api-key"] = deployment.api_key
        self._headers = h
        self._stream_headers = {**h, "Accept": "text/event-stream"}

    def target(self, call: UpstreamCall) -> tuple[str, dict[str, str]]:
        path = ENDPOINT_PATHS.get(call.endpoint, "/v1/messages")
        return self.cfg.base_url + path, self._stream_headers if call.stream else self._headers
