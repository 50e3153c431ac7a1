"""SSE framing: raw upstream chunks in, complete events out, as a plain object fed one chunk at a time.

A relay calls :meth:`SSEFramer.feed` once per read of the upstream's body instead of resuming an
async generator (one frame switch less per read on the stream path, which is the per-read cost the
gateway adds over a bare pass-through; bench/RESULTS.md "Issue 13, streams round 6").
:func:`sse_events` is the same framing as an async generator, for relays that iterate.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from kaiyuan.errors import ErrorKind, GatewayError

MAX_EVENT_BYTES = 64 * 1024 * 1024  # one event buffered at most (a runaway upstream must not exhaust memory)
HOLD_FROM = 256 * 1024  # an unfinished event this long is held as a list of pieces, joined once it ends


def event_too_large(limit: int, why: str) -> GatewayError:
    return GatewayError(ErrorKind.UPSTREAM_ERROR, f"upstream sent a stream event larger than {limit} bytes{why}",
                        code="upstream_event_too_large")


class SSEFramer:
    """Groups raw chunks into complete SSE events (without their blank-line terminator), each at
    most ``limit`` bytes (default MAX_EVENT_BYTES; else a 502 that says so, with ``why``).

    CRLF framing is normalised to LF, also when a CRLF is split across two chunks. An event that
    spans many chunks is not re-copied on every chunk (that was quadratic: one 63 MiB event in
    64 KiB chunks took 63 s of CPU): past HOLD_FROM bytes its pieces are kept and joined once."""

    __slots__ = ("buf", "cr", "held", "limit", "size", "why")

    def __init__(self, limit: int | None = None, why: str = " with no end in sight") -> None:
        self.limit = MAX_EVENT_BYTES if limit is None else limit
        self.why = why
        self.buf = b""
        self.held: list[bytes] = []  # the pieces of one long unfinished event
        self.size = 0  # bytes in held
        self.cr = False  # the previous chunk ended with a CR whose LF may open the next

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events ``chunk`` completes (often none; never an empty event)."""
        if self.cr:
            chunk = b"\r" + chunk
        if chunk.find(b"\r") >= 0:  # find, not `in` (docs/architecture.md, hot path)
            self.cr = cr = chunk.endswith(b"\r")
            chunk = (chunk[:-1] if cr else chunk).replace(b"\r\n", b"\n")
        buf = self.buf
        if self.held:
            return self._feed_held(chunk)
        if not buf and chunk.endswith(b"\n\n"):  # whole events, nothing pending (most chunks)
            events = chunk.split(b"\n\n")
            if events.pop():  # "...\n\n\n": the last LF may open the next terminator; keep it
                self.buf = b"\n"
            return _events(events, chunk)
        scan = max(len(buf) - 1, 0)  # only the new bytes (and one before) can complete a terminator
        buf += chunk
        if buf.find(b"\n\n", scan) < 0:
            if len(buf) > self.limit:
                raise event_too_large(self.limit, self.why)
            if len(buf) >= HOLD_FROM:
                self.held, self.size, buf = [buf], len(buf), b""
            self.buf = buf
            return []
        return self._split(buf)

    def _feed_held(self, chunk: bytes) -> list[bytes]:
        held = self.held
        if not chunk:
            return []
        self.size += len(chunk)
        if chunk.find(b"\n\n") < 0 and not (chunk[:1] == b"\n" and held[-1][-1:] == b"\n"):
            if self.size > self.limit:
                raise event_too_large(self.limit, self.why)
            held.append(chunk)
            return []
        held.append(chunk)
        buf = b"".join(held)
        self.held, self.size = [], 0
        return self._split(buf)

    def _split(self, buf: bytes) -> list[bytes]:
        *events, self.buf = buf.split(b"\n\n")
        return _events(events, buf)

    def pending(self) -> bool:
        """Part of an event (or a CR) from an earlier read is waiting for the next."""
        return bool(self.buf or self.held or self.cr)

    def end(self) -> list[bytes]:
        """What is left when the stream ends: an unterminated last event, if it holds anything."""
        buf = b"".join(self.held) if self.held else self.buf
        self.buf, self.held, self.size = b"", [], 0
        return [buf.lstrip(b"\n")] if buf.strip() else []


def _events(events: list[bytes], text: bytes) -> list[bytes]:
    """The complete events of ``text`` split at its terminators, without empty ones."""
    if text[:1] == b"\n" or text.find(b"\n\n\n") >= 0:
        return _without_blank_lines(events)
    return [e for e in events if e] if b"" in events else events


def _without_blank_lines(events: list[bytes]) -> list[bytes]:
    """Events of a text with a run of three or more LFs (or one at its start): by the SSE spec a
    blank line after the one that ended an event ends nothing, so the LFs that open an event are
    not part of it ("data: a\\n\\n\\ndata: b" is two events, not "data: a" and "\\ndata: b")."""
    out = []
    for e in events:
        if e[:1] == b"\n":
            e = e.lstrip(b"\n")
        if e:
            out.append(e)
    return out


async def sse_events(stream: AsyncIterator[bytes], limit: int | None = None,
                     why: str = " with no end in sight") -> AsyncIterator[list[bytes]]:
    """:class:`SSEFramer` over an async iterator of chunks: each non-empty group of events as it completes."""
    framer = SSEFramer(limit, why)
    feed = framer.feed
    async for chunk in stream:
        events = feed(chunk)
        if events:
            yield events
    events = framer.end()
    if events:
        yield events
