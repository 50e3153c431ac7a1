"""A closed-loop HTTP/1.1 load generator on raw asyncio streams (uvloop), for the benchmark.

``concurrency`` keep-alive connections each send the same precomputed request in a loop, for
``warmup + duration`` seconds (only requests started after the warm-up are recorded), or exactly
``per_conn`` requests each (the stream-holding mode). For every request it records the total time
and, for streams, the time to the first content chunk and the content tokens seen (``tok00000``,
``tok00001``, ... from bench/fast_upstream.py), so lost or reordered chunks are counted exactly.

It parses only what it needs (status line, Content-Length or chunked framing, Connection: close),
which keeps it several times cheaper per request than an aiohttp client: the tool must not be the
bottleneck when it shares a core with the upstream. Input: a JSON spec on the command line;
output: one JSON object on stdout (raw samples, so several processes' results can be merged).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

TOKEN_RE = re.compile(rb"tok(\d{5})")


@dataclass
class Spec:
    host: str
    port: int
    path: str
    body: str
    stream: bool
    concurrency: int
    duration: float = 5.0
    warmup: float = 1.0
    per_conn: int = 0  # >0: each connection sends exactly this many requests (no time limit but `timeout`)
    headers: dict[str, str] = field(default_factory=dict)
    expect_chunks: int = 0  # content tokens each stream must carry
    done_marker: str = "[DONE]"
    timeout: float = 60.0  # per request


@dataclass
class Result:
    latency: list[float] = field(default_factory=list)  # seconds, successful requests
    ttfc: list[float] = field(default_factory=list)  # seconds, successful streams
    ok: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    status_counts: dict[str, int] = field(default_factory=dict)
    chunks_expected: int = 0
    chunks_received: int = 0
    streams_with_loss: int = 0
    missing_done: int = 0
    elapsed: float = 0.0
    completed_all: int = 0  # every answered request, warm-up included (for CPU per request)
    in_window: int = 0  # successful answers that ended inside the measured window (throughput)

    def error(self, msg: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(msg[:300])


class BadResponse(Exception):
    pass


def build_request(spec: Spec) -> bytes:
    body = spec.body.encode()
    lines = [
        f"POST {spec.path} HTTP/1.1",
        f"Host: {spec.host}:{spec.port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    lines += [f"{k}: {v}" for k, v in spec.headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader, t0: float, stream: bool) -> tuple[int, bytes, float | None, bool]:
    """Read one response: (status, body, time of first content token or None, connection must close)."""
    return await read_rest(reader, await reader.readuntil(b"\r\n\r\n"), t0, stream)


async def read_rest(reader: asyncio.StreamReader, head: bytes, t0: float,
                    stream: bool) -> tuple[int, bytes, float | None, bool]:
    """The rest of a response whose ``head`` (status line and headers) is read: see read_response."""
    status = int(head[9:12])
    lower = head.lower()
    close = b"\r\nconnection: close" in lower
    first: float | None = None
    i = lower.find(b"\r\ncontent-length:")
    if i >= 0:
        j = lower.find(b"\r\n", i + 2)
        body = await reader.readexactly(int(lower[i + 17 : j]))
        if stream and b"tok" in body:
            first = time.perf_counter() - t0
        return status, body, first, close
    if b"\r\ntransfer-encoding: chunked" in lower:
        parts: list[bytes] = []
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                break
            data = (await reader.readexactly(size + 2))[:-2]
            if first is None and stream and b"tok" in data:
                first = time.perf_counter() - t0
            parts.append(data)
        return status, b"".join(parts), first, close
    body = await reader.read()  # no framing: the body runs to the end of the connection
    return status, body, first, True


async def worker(spec: Spec, req: bytes, res: Result, record_from: float, stop_at: float) -> None:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    done = 0
    done_marker = spec.done_marker.encode()
    try:
        while True:
            if spec.per_conn:
                if done >= spec.per_conn:
                    return
            elif time.perf_counter() >= stop_at:
                return
            if writer is None:
                try:
                    reader, writer = await asyncio.open_connection(spec.host, spec.port, limit=1 << 20)
                except OSError as e:
                    res.error(f"connect: {e}")
                    await asyncio.sleep(0.05)
                    continue
            assert reader is not None
            t0 = time.perf_counter()
            recorded = t0 >= record_from
            done += 1
            try:
                writer.write(req)
                status, body, first, close = await asyncio.wait_for(read_response(reader, t0, spec.stream), spec.timeout)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError) as e:
                if recorded:
                    res.error(f"{type(e).__name__}: {e}")
                writer.close()
                writer = None
                continue
            t1 = time.perf_counter()
            res.completed_all += 1
            if close:
                writer.close()
                writer = None
            if record_from <= t1 <= stop_at and status == 200:
                res.in_window += 1
            if not recorded:
                continue
            key = str(status)
            res.status_counts[key] = res.status_counts.get(key, 0) + 1
            if status != 200:
                res.error(f"HTTP {status}: {body[:200]!r}")
                continue
            if spec.stream:
                seen = {int(m) for m in TOKEN_RE.findall(body)}
                got = len(seen & set(range(spec.expect_chunks)))
                res.chunks_expected += spec.expect_chunks
                res.chunks_received += got
                if got < spec.expect_chunks:
                    res.streams_with_loss += 1
                if done_marker not in body:
                    res.missing_done += 1
                res.ttfc.append(first if first is not None else t1 - t0)
            res.ok += 1
            res.latency.append(t1 - t0)
    finally:
        if writer is not None:
            writer.close()


async def run(spec: Spec) -> Result:
    res = Result()
    req = build_request(spec)
    now = time.perf_counter()
    record_from = now + (0 if spec.per_conn else spec.warmup)
    stop_at = record_from + spec.duration
    tasks = [asyncio.create_task(worker(spec, req, res, record_from, stop_at)) for _ in range(spec.concurrency)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
    res.elapsed = spec.duration if not spec.per_conn else time.perf_counter() - now
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="closed-loop HTTP load generator (JSON spec in, JSON result out)")
    p.add_argument("spec", help="JSON object with the fields of loadgen.Spec")
    args = p.parse_args(argv)
    spec = Spec(**orjson.loads(args.spec))
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    res = asyncio.run(run(spec))
    out: dict[str, Any] = dict(res.__dict__)
    # the event loop may have left stdout non-blocking: a large result (every latency sample) was
    # then cut at the pipe's capacity while the parent was still busy
    os.set_blocking(sys.stdout.fileno(), True)
    sys.stdout.buffer.write(orjson.dumps(out))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
