"""Which provider class serves which ``provider:`` value in the config. Vendors are data here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kaiyuan.config import DeploymentBase
from kaiyuan.providers.base import Provider


def _openai_compatible(d: Any) -> Provider:
    from kaiyuan.providers.openai_compatible import OpenAICompatibleProvider

    return OpenAICompatibleProvider(d)


def _local(d: Any) -> Provider:
    from kaiyuan.providers.local import LocalProvider

    return LocalProvider(d)


def _anthropic(d: Any) -> Provider:
    from kaiyuan.providers.anthropic import AnthropicProvider

    return AnthropicProvider(d)


def _gemini(d: Any) -> Provider:
    from kaiyuan.providers.gemini import GeminiProvider

    return GeminiProvider(d)


PROVIDERS: dict[str, Callable[[Any], Provider]] = {
    "openai_compatible": _openai_compatible,
    "local": _local,
    "anthropic": _anthropic,
    "gemini": _gemini,
}


def build_provider(deployment: DeploymentBase) -> Provider:
    kind = getattr(deployment, "provider", None)
    factory = PROVIDERS.get(str(kind))
    if factory is None:
        raise ValueError(f"no provider implementation for {kind!r}")
    return factory(deployment)
