"""Frames on the supervisor's private sockets: a 4-byte big-endian length and an orjson list.

Both ends of the shared counters (:mod:`kaiyuan.limits.shared`) are asyncio Protocols that split
frames as bytes arrive, with no stream reader and no task switch per message. A frame over
MAX_FRAME, or one that is not a non-empty JSON list, closes its connection: nothing on it is ever
executed or unpickled.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import orjson

MAX_FRAME = 16 * 1024 * 1024


def frame(msg: list[Any]) -> bytes:
    body = orjson.dumps(msg)
    return len(body).to_bytes(4, "big") + body


class Frames(asyncio.Protocol):
    """Bytes in, whole messages out (:meth:`on_message`); a frame over MAX_FRAME or one that is not
    a JSON list closes the connection."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a registered subclass

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        at, end = 0, len(buf)
        try:
            while end - at >= 4:
                n = int.from_bytes(buf[at:at + 4], "big")
                if n > MAX_FRAME:
                    raise ValueError(f"frame of {n} bytes is over the limit")
                if end - at - 4 < n:
                    break
                msg = orjson.loads(memoryview(buf)[at + 4:at + 4 + n])
                at += 4 + n
                if not isinstance(msg, list) or not msg:
                    raise ValueError("a frame that is not a message")
                self.on_message(msg)
        except Exception as e:
            self.bad(e)
            return
        finally:
            if at:
                del buf[:at]

    def on_message(self, msg: list[Any]) -> None:
        raise NotImplementedError

    def bad(self, e: Exception) -> None:
        raise NotImplementedError
