"""The provider contract: a transport that sends one call in its own wire protocol.

Providers do no translation: the pipeline hands them a body already in their ``protocol``
("openai", "anthropic" or "gemini") and gets back the upstream's bytes. Non-2xx statuses come
back as replies (the pipeline decides what they mean); only transport failures raise, as
:class:`kaiyuan.errors.GatewayError` (502 unreachable, 504 timeout).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kaiyuan.config import DeploymentBase


@dataclass(slots=True)
class UpstreamCall:
    endpoint: str  # "chat" | "completions" | "embeddings" | "messages" | "count_tokens" | ...
    body: dict[str, Any]
    stream: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    body_bytes: bytes | None = None  # pre-serialised body (pass-through fast path)


class ChunkStream(ABC):
    """An upstream stream's bytes, read with one await per chunk: a transport's reader that counts
    what it received and takes back the first chunk the executor looked at (``unread``), so no
    generator wraps it on the way to the relay (one frame switch per layer and read)."""

    __slots__ = ("received",)

    def __init__(self) -> None:
        self.received = 0  # bytes read from the upstream so far

    def __aiter__(self) -> ChunkStream:
        return self

    @abstractmethod
    async def __anext__(self) -> bytes:
        """The next chunk (never empty); StopAsyncIteration at the stream's end."""

    @abstractmethod
    def unread(self, chunk: bytes) -> None:
        """Give ``chunk`` back: the next read returns it (already counted in ``received``)."""


@dataclass(slots=True)
class UpstreamReply:
    status: int
    headers: Mapping[str, str]
    body: bytes | None = None  # the whole body (non-stream, or any error)
    stream: AsyncIterator[bytes] | None = None  # raw SSE bytes as they arrive (2xx streams only)
    parsed: dict[str, Any] | None = None  # a 2xx whole body as JSON, once the executor has checked it
    deadline: float | None = None  # time.monotonic() by which the call and its relay must be over (timeouts.total)
    received: int = 0  # bytes of a stream read so far (a bound on what a usage report can claim)
    truncated: bool = False  # ``body`` is the start of a longer error body (max_error_bytes)
    _closer: Any = None
    _finisher: Any = None  # like _closer, for a stream whose consumer saw its final event (may keep the connection)

    def bytes_received(self) -> int:
        if isinstance(self.stream, ChunkStream):
            return self.stream.received
        return self.received if self.stream is not None else len(self.body or b"")

    async def aclose(self, finished: bool = False) -> None:
        """Release the upstream connection: cancels an unfinished upstream stream; ``finished`` (the
        client has the whole answer) lets a stream be read to its end and keep its connection."""
        closer = self._finisher if finished and self._finisher is not None else self._closer
        self._closer = self._finisher = None
        if closer is not None:
            res = closer()
            if res is not None and hasattr(res, "__await__"):  # (hasattr(None, ...) raises inside)
                await res


class Provider(ABC):
    protocol: ClassVar[str] = "openai"

    def __init__(self, deployment: DeploymentBase) -> None:
        self.deployment = deployment
        self.id: str = deployment.id or deployment.default_id()

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open pools, load weights. Must not raise for a missing optional runtime: see ``unavailable``."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release everything ``start`` opened."""

    @property
    def unavailable(self) -> str | None:
        """``None`` when usable, else one line saying why and how to fix it."""
        return None

    @abstractmethod
    async def send(self, call: UpstreamCall) -> UpstreamReply:
        """Send one call. The caller must ``aclose()`` the reply when done with a stream."""
