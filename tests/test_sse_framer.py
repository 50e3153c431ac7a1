"""server.sse_framer: the SSE framing the stream relays share, fed one read at a time.

The framer must give the same events however the upstream's bytes are cut into reads: CRLF or LF
framing (a CRLF split across two reads too), empty events, long events held as pieces past
HOLD_FROM, an unterminated last event, and the event size cap. The reference is the whole stream
framed at once, event by event. The relay built on it is checked against a generator-fed relay
(the shape before the reader and the framer were collapsed into one loop)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from kaiyuan.errors import GatewayError
from kaiyuan.providers.base import ChunkStream
from kaiyuan.server import sse_framer
from kaiyuan.server.sse_framer import SSEFramer, sse_events


def reference(raw: bytes) -> list[bytes]:
    """The events of a whole stream, framed at once as the SSE spec reads it: an event is a run of
    non-blank lines ended by a blank line; more blank lines in a row end nothing more."""
    events: list[bytes] = []
    lines: list[bytes] = []
    for line in raw.replace(b"\r\n", b"\n").split(b"\n"):
        if line:
            lines.append(line)
        elif lines:
            events.append(b"\n".join(lines))
            lines = []
    last = b"\n".join(lines)
    return events + ([last] if last.strip() else [])


def random_stream(rnd: random.Random, crlf: bool) -> bytes:
    out = []
    if rnd.random() < 0.2:
        out.append(rnd.choice([b"\n", b"\n\n\n"]))  # blank lines before the first event
    for i in range(rnd.randint(1, 12)):
        size = rnd.choice([0, 1, 5, 40, 300, 5000])
        out.append(b"data: " + bytes([97 + i % 26]) * size)
        out.append(rnd.choice([b"\n\n", b"\n\n", b"\n\n\n", b"\n\n\n\n", b"\n\n\n\n\n", b"\nid: 3\n\n"]))
    if rnd.random() < 0.3:
        out.append(b"data: unterminated")
    raw = b"".join(out)
    return raw.replace(b"\n", b"\r\n") if crlf else raw


def cut(raw: bytes, rnd: random.Random) -> list[bytes]:
    if len(raw) < 2:
        return [raw]
    points = sorted(rnd.sample(range(1, len(raw)), rnd.randint(0, min(40, len(raw) - 1))))
    return [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]


def framed(reads: list[bytes], limit: int | None = None) -> list[bytes]:
    f = SSEFramer(limit)
    out = [ev for r in reads for ev in f.feed(r)]
    return out + f.end()


@pytest.mark.parametrize("crlf", [False, True])
@pytest.mark.parametrize("hold_from", [256 * 1024, 64])
def test_the_framer_agrees_with_the_whole_stream_framed_at_once(crlf: bool, hold_from: int,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse_framer, "HOLD_FROM", hold_from)  # 64: long events go through the held pieces
    rnd = random.Random(11)
    for _ in range(300):
        raw = random_stream(rnd, crlf)
        want = reference(raw)
        assert framed([raw]) == want
        assert framed([raw[i:i + 1] for i in range(len(raw))]) == want  # a byte a read: every CR/LF split
        for _ in range(5):
            assert framed(cut(raw, rnd)) == want


def test_sse_events_yields_the_framers_groups() -> None:
    rnd = random.Random(5)

    async def collect(reads: list[bytes]) -> list[bytes]:
        async def gen() -> AsyncIterator[bytes]:
            for r in reads:
                yield r
        return [ev async for group in sse_events(gen()) for ev in group]

    for _ in range(50):
        raw = random_stream(rnd, rnd.random() < 0.5)
        reads = cut(raw, rnd)
        assert asyncio.run(collect(reads)) == framed(reads) == reference(raw)


def test_an_event_buffered_past_the_limit_fails_however_it_is_read() -> None:
    """The cap bounds what the framer buffers across reads (a read is in memory already: one that
    holds a whole event is passed on as it is)."""
    raw = b"data: ok\n\n" + b"data: " + b"x" * 1000 + b"\n\ndata: after\n\n"
    rnd = random.Random(2)
    cuts = [[raw[i:i + n] for i in range(0, len(raw), n)] for n in (1, 7, 300, 499)]
    cuts += [c for c in (cut(raw, rnd) for _ in range(200)) if max(map(len, c)) < 500][:20]
    for reads in cuts:
        with pytest.raises(GatewayError, match="larger than 500 bytes"):
            framed(reads, limit=500)
        assert framed(reads, limit=2000) == reference(raw)


class _Chunks(ChunkStream):
    """A transport reader as the executor sees it: the first chunk is read, then given back."""

    def __init__(self, reads: list[bytes]) -> None:
        super().__init__()
        self.reads = list(reads)
        self.pending: bytes | None = None

    def unread(self, chunk: bytes) -> None:
        self.pending = chunk

    async def __anext__(self) -> bytes:
        if self.pending is not None:
            chunk, self.pending = self.pending, None
            return chunk
        if not self.reads:
            raise StopAsyncIteration
        chunk = self.reads.pop(0)
        self.received += len(chunk)
        return chunk


def test_the_relay_reads_a_chunk_stream_as_it_reads_a_generator() -> None:
    """The OpenAI relay fed by a transport reader (one await a read, the first chunk given back)
    writes what the same relay writes when fed by a generator, for random cuts of a stream."""
    from tests.test_sse_relay import _relay, _stream

    raw = _stream()
    rnd = random.Random(9)

    async def via_reader(reads: list[bytes]) -> tuple[bytes, int]:
        chunks = _Chunks(reads)
        chunks.unread(await chunks.__anext__())  # as the executor does with the first chunk
        out, _ctx = await _relay(reads, True, None, source=chunks)
        return out, chunks.received

    for _ in range(30):
        reads = cut(raw, rnd)
        want, _ = asyncio.run(_relay(reads, True, None))
        got, received = asyncio.run(via_reader(reads))
        assert got == want
        assert raw.index(b"data: [DONE]") < received <= len(raw)  # read up to the end of the answer
