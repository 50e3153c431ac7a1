"""Google's Gemini API: models/{model}:generateContent, or :streamGenerateContent?alt=sse for streams,
with the key in x-goog-api-key."""

from __future__ import annotations

from typing import ClassVar
from urllib.parse import quote

from kaiyuan.config import GeminiDeployment, credential_headers, upstream_url
from kaiyuan.providers.base import UpstreamCall
from kaiyuan.providers.http import PooledHTTPProvider


class GeminiProvider(PooledHTTPProvider):
    protocol: ClassVar[str] = "gemini"

    def __init__(self, deployment: GeminiDeployment) -> None:
        super().__init__(deployment)
        h = {"Content-Type": "application/json", "Accept": "application/json",
             **credential_headers(deployment.base_url), **deployment.headers}
        if deployment.api_key:
            h["x-goog-api-key"] = deployment.api_key
        self._headers = h
        self._stream_headers = {**h, "Accept": "text/event-stream"}
        model = deployment.model if deployment.model.startswith(("models/", "tunedModels/")) else "models/" + deployment.model
        path = "/" + quote(model, safe="/")
        self._url = upstream_url(deployment.base_url, path + ":generateContent")
        self._stream_url = upstream_url(deployment.base_url, path + ":streamGenerateContent?alt=sse")

    def target(self, call: UpstreamCall) -> tuple[str, dict[str, str]]:
        if call.stream:
            return self._stream_url, self._stream_headers
        return self._url, self._headers
