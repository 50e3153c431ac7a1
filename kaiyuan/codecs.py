"""Content-Encoding decoding that never inflates more than it is allowed to.

A few kilobytes of gzip, Brotli or zstd can expand to gigabytes. Every decoder here produces its
output in bounded pieces (:data:`PIECE` bytes at most per step), so that

- a request body is decoded only up to ``server.max_body_bytes`` (a 413 past it, however small the
  body was on the wire), and
- an upstream reply (whole body or stream) is decoded piece by piece, with the caller free to
  count, stop, and give the event loop a turn between pieces.

Used by ``server.common`` (request bodies, aiohttp's own request decompression is off) and by
``providers.http`` (upstream replies, aiohttp's auto-decompression is off). Brotli needs
``brotli>=1.2`` (bounded ``process``); zstd (requests only: the gateway does not offer it
upstream) needs ``zstandard``.
"""

from __future__ import annotations

import asyncio
import io
import zlib
from collections.abc import Iterator
from typing import Protocol

try:
    import brotli  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # pragma: no cover - a declared dependency; tolerate an environment without it
    brotli = None
try:
    import zstandard
except ImportError:  # pragma: no cover - a declared dependency
    zstandard = None  # type: ignore[assignment]

PIECE = 256 * 1024  # the most one decoding step produces

_BR_OK = brotli is not None and hasattr(brotli, "Decompressor") and hasattr(brotli.Decompressor(), "can_accept_more_data")
REQUEST_CODINGS: tuple[str, ...] = ("gzip", "x-gzip", "deflate", "identity") + (("br",) if _BR_OK else ()) + (
    ("zstd",) if zstandard is not None else ()
)
# What the gateway offers upstreams (Accept-Encoding): codings it can decode incrementally from a stream.
UPSTREAM_ACCEPT = "gzip, deflate" + (", br" if _BR_OK else "")
UPSTREAM_CODINGS = frozenset(("gzip", "x-gzip", "deflate", "identity") + (("br",) if _BR_OK else ()))

DECODE_ERRORS: tuple[type[Exception], ...] = (zlib.error, ValueError, EOFError) + (
    (brotli.error,) if brotli is not None else ()
) + ((zstandard.ZstdError,) if zstandard is not None else ())


class TooLarge(Exception):
    """The decoded data passed the limit it was decoded under."""


class Decoder(Protocol):
    def feed(self, data: bytes) -> Iterator[bytes]:
        """The decoded output of ``data`` (after what was fed before), in pieces of at most PIECE."""
        ...

    def finish(self) -> None:
        """Raise ValueError if the encoded data ended early."""
        ...


class _Identity:
    def feed(self, data: bytes) -> Iterator[bytes]:
        for i in range(0, len(data), PIECE):
            yield data[i:i + PIECE]

    def finish(self) -> None:
        return None


class _Zlib:
    """gzip (also several concatenated members) or deflate (zlib-wrapped or raw, as clients send it)."""

    def __init__(self, coding: str) -> None:
        self.gzip = coding != "deflate"
        self.d: zlib._Decompress | None = None
        self.started = False

    def _new(self, first: bytes) -> zlib._Decompress:
        if self.gzip:
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        return zlib.decompressobj(zlib.MAX_WBITS if first[:1] and first[0] & 0x0F == 8 else -zlib.MAX_WBITS)

    def feed(self, data: bytes) -> Iterator[bytes]:
        while data:
            if self.d is None or (self.d.eof and self.gzip):
                self.d = self._new(data)
                self.started = True
            elif self.d.eof:  # deflate: bytes after the end are ignored, as zlib does
                return
            out = self.d.decompress(data, PIECE)
            data = self.d.unconsumed_tail or (self.d.unused_data if self.d.eof and self.gzip else b"")
            if out:
                yield out

    def finish(self) -> None:
        if self.d is not None and not self.d.eof:
            raise ValueError("the compressed data ends early")


class _Brotli:
    def __init__(self) -> None:
        assert brotli is not None
        self.d = brotli.Decompressor()

    def feed(self, data: bytes) -> Iterator[bytes]:
        out = self.d.process(data, output_buffer_limit=PIECE)
        while out:  # more may be pending (input not taken yet, or output held back) until a step yields nothing
            yield out
            if self.d.is_finished() and self.d.can_accept_more_data():
                return
            out = self.d.process(b"", output_buffer_limit=PIECE)

    def finish(self) -> None:
        if not self.d.is_finished():
            raise ValueError("the compressed data ends early")


def decoder(coding: str) -> Decoder:
    """A fresh decoder for one coding (gzip, x-gzip, deflate, br, identity); ValueError otherwise."""
    if coding in ("gzip", "x-gzip", "deflate"):
        return _Zlib(coding)
    if coding == "br" and _BR_OK:
        return _Brotli()
    if coding == "identity":
        return _Identity()
    raise ValueError(f"no incremental decoder for {coding!r}")


def decode_all(raw: bytes, coding: str, max_bytes: int) -> bytes:
    """``raw`` decoded from one coding, at most ``max_bytes`` (TooLarge past it)."""
    return b"".join(_bounded(raw, coding, max_bytes))


async def decode_all_turning(raw: bytes, coding: str, max_bytes: int) -> bytes:
    """:func:`decode_all`, with a turn of the event loop between two pieces: a body of a few bytes
    that inflates to megabytes does not hold the loop (16 MiB in one call: 50-110 ms for gzip and
    br, 20 ms for zstd, on a busy 2-core machine)."""
    out: list[bytes] = []
    for piece in _bounded(raw, coding, max_bytes):
        if out:
            await asyncio.sleep(0)
        out.append(piece)
    return b"".join(out)


def _bounded(raw: bytes, coding: str, max_bytes: int) -> Iterator[bytes]:
    """The decoded pieces of ``raw``; TooLarge once they pass ``max_bytes`` together."""
    size = 0
    for piece in _pieces(raw, coding):
        size += len(piece)
        if size > max_bytes:
            raise TooLarge
        yield piece


def _pieces(raw: bytes, coding: str) -> Iterator[bytes]:
    """``raw`` decoded, PIECE bytes at most at a time (ValueError when it ends early)."""
    if coding == "zstd":
        yield from _zstd(raw)
        return
    d = decoder(coding)
    yield from d.feed(raw)
    d.finish()


def _zstd(raw: bytes) -> Iterator[bytes]:
    if zstandard is None:  # pragma: no cover
        raise ValueError("zstd is not available")
    any_out = False
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw), read_across_frames=True) as r:
        while piece := r.read(PIECE):
            any_out = True
            yield piece
    if raw and not any_out and raw[:4] != b"\x28\xb5\x2f\xfd":
        raise ValueError("not zstd data")
