"""A fast fake OpenAI-compatible upstream for the benchmark: a raw asyncio Protocol on uvloop.

It answers ``POST /v1/chat/completions`` (and ``/chat/completions``) with precomputed bytes over
keep-alive HTTP/1.1, so it costs a few microseconds per request and is never the bottleneck:

- non-streaming: one JSON chat completion (``Content-Length``);
- streaming (``"stream": true`` in the body): ``text/event-stream`` with ``Transfer-Encoding: chunked``,
  one HTTP chunk per SSE event: a role chunk, N content chunks (``tok00000``, ``tok00001``, ...),
  a finish chunk, a usage chunk when the body asks for ``"include_usage": true``, then ``data: [DONE]``.

The upstream model name picks the stream shape, so the gateways under test need no special knobs:
``fast`` (or any name) sends ``--chunks`` chunks back to back; ``paced-<chunks>-<ms>`` sends
``<chunks>`` chunks ``<ms>`` milliseconds apart (used to hold many streams open at once).

``GET /__stats`` returns counters (requests, streams, active and peak concurrent streams);
``POST /__reset`` zeroes them. Only ever listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
from collections.abc import Callable
from typing import Any, cast

import orjson

MODEL_RE = re.compile(rb'"model"\s*:\s*"([^"]{1,200})"')
STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
USAGE_RE = re.compile(rb'"include_usage"\s*:\s*true')
PACED_RE = re.compile(r"paced-(\d+)-(\d+)")
MAX_BODY = 16 * 1024 * 1024


def token(i: int) -> str:
    return f"tok{i:05d}"


def _http(status: str, ctype: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        "Connection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
)
CHUNK_END = b"0\r\n\r\n"


class Responses:
    """Precomputed response bytes for one upstream model name."""

    def __init__(self, model: str, chunks: int, interval_s: float) -> None:
        self.interval_s = interval_s
        base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": model}
        text = " ".join(token(i) for i in range(chunks))
        usage = {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks}
        full = {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1700000000,
            "model": model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": "stop"}
            ],
            "usage": usage,
        }
        self.json = _http("200 OK", "application/json", orjson.dumps(full))

        def ev(obj: dict[str, Any]) -> bytes:
            return _chunk(b"data: " + orjson.dumps(obj) + b"\n\n")

        def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        events = [ev(choice({"role": "assistant", "content": ""}))]
        events += [ev(choice({"content": token(i) + " "})) for i in range(chunks)]
        events.append(ev(choice({}, "stop")))
        self.events = events
        self.usage_event = ev({**base, "choices": [], "usage": usage})
        self.tail = _chunk(b"data: [DONE]\n\n") + CHUNK_END

    def stream_parts(self, usage: bool) -> list[bytes]:
        parts = [STREAM_HEAD + self.events[0], *self.events[1:]]
        if usage:
            parts.append(self.usage_event)
        parts.append(self.tail)
        return parts


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.streams = 0
        self.active_streams = 0
        self.peak_streams = 0
        self.connections = 0
        self.peak_connections = 0
        self.open_connections = 0
        self.unknown_paths: dict[str, int] = {}  # what a gateway asked for that this upstream lacks

    def as_json(self) -> bytes:
        return orjson.dumps(self.__dict__)


class Upstream:
    def __init__(self, chunks: int) -> None:
        self.chunks = chunks
        self.cache: dict[bytes, Responses] = {}
        self.stats = Stats()

    def responses(self, model: bytes) -> Responses:
        r = self.cache.get(model)
        if r is None:
            name = model.decode("utf-8", "replace")
            m = PACED_RE.fullmatch(name)
            if m:
                r = Responses(name, int(m.group(1)), int(m.group(2)) / 1000)
            else:
                r = Responses(name, self.chunks, 0.0)
            self.cache[model] = r
        return r


NOT_FOUND = _http("404 Not Found", "application/json", b'{"error":{"message":"not found","type":"invalid_request_error","param":null,"code":null}}')
BAD = _http("400 Bad Request", "application/json", b'{"error":{"message":"bad request","type":"invalid_request_error","param":null,"code":null}}')
CHAT_PATHS = (b"/v1/chat/completions", b"/chat/completions")


class Conn(asyncio.Protocol):
    def __init__(self, up: Upstream) -> None:
        self.up = up
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a paced stream is being written; further requests wait in buf
        self.handle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        s = self.up.stats
        s.connections += 1
        s.open_connections += 1
        s.peak_connections = max(s.peak_connections, s.open_connections)

    def connection_lost(self, exc: Exception | None) -> None:
        self.up.stats.open_connections -= 1
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
            self.up.stats.active_streams -= 1
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        if not self.busy:
            self.process()

    def process(self) -> None:
        t = self.transport
        while t is not None and not self.busy:
            buf = self.buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = buf[:end]
            lower = head.lower()
            i = lower.find(b"\r\ncontent-length:")
            length = 0
            if i >= 0:
                j = lower.find(b"\r\n", i + 2)
                length = int(lower[i + 17 : j if j > 0 else len(lower)].strip())
            elif b"\r\ntransfer-encoding:" in lower:
                t.write(BAD)
                t.close()
                return
            if length > MAX_BODY:
                t.write(BAD)
                t.close()
                return
            total = end + 4 + length
            if len(buf) < total:
                return
            body = buf[end + 4 : total]
            self.buf = buf[total:]
            line_end = head.find(b"\r\n")
            parts = head[: line_end if line_end >= 0 else len(head)].split(b" ")
            method, path = (parts[0], parts[1]) if len(parts) >= 3 else (b"", b"")
            self.respond(t, method, path, body)

    def respond(self, t: asyncio.Transport, method: bytes, path: bytes, body: bytes) -> None:
        up = self.up
        if method == b"POST" and path in CHAT_PATHS:
            up.stats.requests += 1
            m = MODEL_RE.search(body)
            r = up.responses(m.group(1) if m else b"fast")
            if STREAM_RE.search(body) is None:
                t.write(r.json)
                return
            up.stats.streams += 1
            parts = r.stream_parts(USAGE_RE.search(body) is not None)
            if r.interval_s <= 0:
                for p in parts:  # one write per SSE event: separate TCP segments, as a real upstream sends
                    t.write(p)
                return
            s = up.stats
            s.active_streams += 1
            s.peak_streams = max(s.peak_streams, s.active_streams)
            self.busy = True
            t.write(parts[0])
            self._pace(parts, 1, r.interval_s)
            return
        if method == b"GET" and path == b"/__stats":
            t.write(_http("200 OK", "application/json", up.stats.as_json()))
        elif method == b"POST" and path == b"/__reset":
            s = up.stats
            open_now, active = s.open_connections, s.active_streams
            s.reset()
            s.open_connections = s.peak_connections = open_now
            s.active_streams = s.peak_streams = active
            t.write(_http("200 OK", "application/json", b"{}"))
        elif method == b"GET" and path in (b"/v1/models", b"/models"):
            t.write(_http("200 OK", "application/json", b'{"object":"list","data":[{"id":"fast","object":"model","created":0,"owned_by":"bench"}]}'))
        else:
            key = f"{method.decode(errors='replace')} {path.decode(errors='replace')}"[:200]
            if key in up.stats.unknown_paths or len(up.stats.unknown_paths) < 20:
                up.stats.unknown_paths[key] = up.stats.unknown_paths.get(key, 0) + 1
            t.write(NOT_FOUND)

    def _pace(self, parts: list[bytes], i: int, interval: float) -> None:
        loop = asyncio.get_running_loop()

        def step(i: int = i) -> None:
            t = self.transport
            if t is None:
                return
            t.write(parts[i])
            if i + 1 < len(parts):
                self.handle = loop.call_later(interval, step, i + 1)
            else:
                self.handle = None
                self.up.stats.active_streams -= 1
                self.busy = False
                if self.buf:
                    self.process()

        self.handle = loop.call_later(interval, step)


async def serve(port: int, chunks: int, ready: Callable[[int], None]) -> None:
    loop = asyncio.get_running_loop()
    up = Upstream(chunks)
    server = await loop.create_server(lambda: Conn(up), "127.0.0.1", port, backlog=4096, reuse_address=True)
    ready(server.sockets[0].getsockname()[1])
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--port", type=int, default=0, help="0 picks a free port; the chosen one is printed")
    p.add_argument("--chunks", type=int, default=20, help="content chunks per stream for non-paced models")
    args = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - plain asyncio still works, just slower
        pass

    def ready(port: int) -> None:
        print(f"PORT {port} PID {os.getpid()}", flush=True)

    asyncio.run(serve(args.port, args.chunks, ready))
    return 0


if __name__ == "__main__":
    sys.exit(main())
