"""Reading an upstream reply's body without letting the upstream stall the event loop or fill memory.

Measured before (issue 9): a gzip-bombed stream stalled the loop for 2.5 s, a 1 MB gzip body
inflated to 2 GB before the size check saw it, and a 60 MiB error body stalled the loop for 11 s.
aiohttp's own decompression (``auto_decompress``) inflates each network chunk whole, in one call,
before anything can count it. So the upstream session runs with it off, and here

- a compressed body (gzip, deflate, br: :data:`kaiyuan.codecs.UPSTREAM_CODINGS`, the decoders the
  request side uses too) is decoded by us, at most :data:`kaiyuan.codecs.PIECE` bytes per step,
  with a turn of the event loop between two steps of one chunk, and counted as it is decoded: the
  deployment's ``max_response_bytes`` caps the *decoded* size of a whole body and of a compressed
  stream (a bomb ends in a 502 ``upstream_reply_too_large``, never in gigabytes);
- a stream, compressed or not, may send at most the deployment's ``max_stream_bytes`` (decoded):
  an upstream that streams without end (events with no tokens, an endless SSE comment) is cut there
  with a 502 ``upstream_stream_too_large``, not only by ``timeouts.total`` (the count of an
  uncompressed stream is kept by ``providers.http``, one addition per chunk);
- an error body (non-2xx) is read up to the smaller ``max_error_bytes`` (default 1 MiB) and then
  cut: the rest is not read, the connection is closed instead of drained;
- any other coding is a 502 that names it, never bytes passed on undecoded.

An uncompressed body with a known length within the limit is read in one ``read()``, as before:
the plain path costs nothing more.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

import aiohttp

from kaiyuan.codecs import DECODE_ERRORS, UPSTREAM_CODINGS, Decoder, decoder
from kaiyuan.errors import ErrorKind, GatewayError

TOO_LARGE_CODE = "upstream_reply_too_large"
STREAM_TOO_LARGE_CODE = "upstream_stream_too_large"


def reply_decoder(headers: Mapping[str, str], label: str) -> Decoder | None:
    """The decoder for a reply's ``Content-Encoding``; None when it is not encoded (or ``identity``)."""
    enc = headers.get("Content-Encoding")
    if not enc:
        return None
    codings = [c.strip().lower() for c in enc.split(",") if c.strip().lower() not in ("", "identity")]
    if not codings:
        return None
    if len(codings) > 1 or codings[0] not in UPSTREAM_CODINGS:
        offered = ", ".join(sorted(c for c in UPSTREAM_CODINGS if c not in ("identity", "x-gzip")))
        raise GatewayError(ErrorKind.UPSTREAM_ERROR, f"upstream {label} sent a body in Content-Encoding "
                                                     f"{enc[:64]!r}, which this gateway cannot decode (it asks for "
                                                     f"{offered})", code="upstream_bad_encoding")
    return decoder(codings[0])


def too_large(label: str, limit: int) -> GatewayError:
    return GatewayError(
        ErrorKind.UPSTREAM_ERROR,
        f"upstream {label} sent a reply body larger than this deployment's limit of {limit} bytes "
        f"(max_response_bytes, counted after decompression); raise max_response_bytes if such replies are expected",
        code=TOO_LARGE_CODE,
    )


def stream_too_large(label: str, limit: int) -> GatewayError:
    return GatewayError(
        ErrorKind.UPSTREAM_ERROR,
        f"upstream {label} sent a stream longer than this deployment's limit of {limit} bytes (max_stream_bytes, "
        f"counted after decompression); the gateway closed it and the answer is incomplete",
        code=STREAM_TOO_LARGE_CODE,
    )


async def read_whole(resp: aiohttp.ClientResponse, limit: int, label: str, cut: bool) -> tuple[bytes, bool]:
    """The body, decoded, and whether it was cut. Past ``limit`` (decoded) bytes: with ``cut``, the
    first ``limit`` bytes (the caller must close the connection, not release it), else a 502."""
    dec = reply_decoder(resp.headers, label)
    length = resp.content_length
    if dec is None and length is not None and length <= limit:
        return await resp.read(), False  # the common case: a known, allowed size
    if dec is None and length is not None and not cut:
        raise too_large(label, limit)  # refused before reading
    chunks: list[bytes] = []
    size = 0
    try:
        async for piece in _pieces(resp, dec):
            size += len(piece)
            if size > limit:
                if not cut:
                    raise too_large(label, limit)
                chunks.append(piece[: len(piece) - (size - limit)])
                return b"".join(chunks), True
            chunks.append(piece)
        if dec is not None:
            dec.finish()
    except DECODE_ERRORS as e:
        raise _undecodable(label, e) from None
    return b"".join(chunks), False


async def _pieces(resp: aiohttp.ClientResponse, dec: Decoder | None) -> AsyncIterator[bytes]:
    async for chunk in resp.content.iter_any():
        if dec is None:
            yield chunk
            continue
        for i, piece in enumerate(dec.feed(chunk)):
            if i:  # one chunk that inflates to many pieces: let the loop run between them
                await asyncio.sleep(0)
            yield piece


async def decoded_stream(chunks: AsyncIterator[bytes], dec: Decoder, limit: int, label: str) -> AsyncIterator[bytes]:
    """A compressed stream's chunks, decoded as they arrive (a piece at a time, a loop turn between
    pieces of one chunk), at most ``limit`` bytes in all (``max_stream_bytes``: then a 502 error)."""
    size = 0
    try:
        async for chunk in chunks:
            for i, piece in enumerate(dec.feed(chunk)):
                if i:
                    await asyncio.sleep(0)
                size += len(piece)
                if size > limit:
                    raise stream_too_large(label, limit)
                yield piece
        dec.finish()
    except DECODE_ERRORS as e:
        raise _undecodable(label, e) from None


def _undecodable(label: str, e: Exception) -> GatewayError:
    return GatewayError(ErrorKind.UPSTREAM_ERROR, f"upstream {label} sent a body that does not decode "
                                                  f"as its Content-Encoding says: {e}")
