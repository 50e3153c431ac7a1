"""Secrets never leave the gateway: one rule, applied where text leaves.

Upstreams sometimes echo the key they were sent in an error body ("Incorrect API key provided:
sk-abc..."), and exception texts can carry URLs with credentials. Anything that leaves the gateway
(an error to the caller, a request-log row, a span, a log line) goes through :func:`scrub`, which
replaces

- every configured secret (deployment ``api_key``, credential-looking header values, the
  ``user:pass`` and query values of a ``base_url``, the master key), registered at start with
  :func:`register_secrets` by the gateway, and
- common key shapes, configured or not: ``sk-...`` / ``sk-ant-...`` / ``sk-proj-...``, Google
  ``AIza...``, AWS ``AKIA...``, GitHub ``ghp_...``, Slack ``xox?-...``, JWTs, ``Bearer <token>``,
  ``Basic <token>``, ``user:pass@`` in URLs and ``key=`` / ``token=`` / ``secret=`` style parameters

with ``[REDACTED]``. The registry is process-wide (log handlers are too) and bounded; registering
more secrets only ever redacts more. :func:`scrub` is cheap on text with no secret in it (one
compiled regex search), and it is only called on the way out, mostly for errors.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

MASK = "[REDACTED]"
MIN_SECRET_LEN = 8  # shorter configured values are not treated as secrets (they would mask ordinary words)
MAX_SECRETS = 4096

_SHAPES = [
    r"sk-(?:ant-|proj-|or-)?[A-Za-z0-9_\-]{16,}",
    r"AIza[0-9A-Za-z_\-]{30,}",
    r"AKIA[0-9A-Z]{16}",
    r"gh[pousr]_[A-Za-z0-9]{30,}",
    r"xox[abposr]-[A-Za-z0-9\-]{10,}",
    r"eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*",
    r"(?<=[Bb]earer )[A-Za-z0-9._~+/=\-]{8,}",
    r"(?<=[Bb]asic )[A-Za-z0-9+/=]{8,}",
    r"(?<=://)[^/\s@:\"']+:[^/\s@\"']+(?=@)",
    r"(?<=[?&;\s\"'])(?P<param>(?i:api[_-]?key|key|token|access[_-]?token|secret|password|passwd|sig|signature))=[^&\s\"'<>]+",
]
_PATTERN = re.compile("|".join(_SHAPES))


class _Registry:
    """The configured secrets, longest first, compiled into one alternation."""

    def __init__(self) -> None:
        self.secrets: set[str] = set()
        self.literal: re.Pattern[str] | None = None

    def add(self, values: Iterable[str | None]) -> None:
        new = {v.strip() for v in values if v and len(v.strip()) >= MIN_SECRET_LEN} - self.secrets
        if not new or len(self.secrets) >= MAX_SECRETS:
            return
        self.secrets |= set(list(new)[: MAX_SECRETS - len(self.secrets)])
        ordered = sorted(self.secrets, key=len, reverse=True)
        self.literal = re.compile("|".join(re.escape(s) for s in ordered))


_REGISTRY = _Registry()


def register_secrets(values: Iterable[str | None]) -> None:
    """Add configured secrets (empty, None and very short values are ignored)."""
    _REGISTRY.add(values)


def _mask(m: re.Match[str]) -> str:
    name = m.group("param")
    return f"{name}={MASK}" if name else MASK


def scrub(text: str) -> str:
    """``text`` with every configured secret and every common key shape replaced by ``[REDACTED]``."""
    if not text:
        return text
    lit = _REGISTRY.literal
    if lit is not None and lit.search(text):
        text = lit.sub(MASK, text)
    if _PATTERN.search(text):
        text = _PATTERN.sub(_mask, text)
    return text


def scrub_bytes(data: bytes) -> bytes:
    """:func:`scrub` for bytes (an upstream event forwarded as is): UTF-8 in, UTF-8 out."""
    text = data.decode("utf-8", "replace")
    out = scrub(text)
    return data if out == text else out.encode()


def scrub_opt(text: str | None) -> str | None:
    return scrub(text) if text else text


def clip(text: str | None, limit: int) -> str | None:
    """``text`` cut to ``limit`` characters (a marker says how much was cut): logged strings from
    callers and upstreams are bounded, so that no request can grow the log without limit."""
    if text is None or len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more chars]"


CLIP_MARGIN = 1024  # longer than any key shape or configured secret this rule is meant to catch


def clip_scrubbed(text: str, limit: int) -> str:
    """``text`` scrubbed and cut to ``limit`` characters, at a cost bounded by ``limit`` rather than
    by ``len(text)`` (scrubbing 1 MiB takes ~100 ms of the event loop): the text is scrubbed up to
    :data:`CLIP_MARGIN` characters past the cut, so a secret that straddles the cut is still masked."""
    if len(text) <= limit:
        return scrub(text)
    head = scrub(text[: limit + CLIP_MARGIN])[:limit]
    return f"{head}...[cut: {len(text) - limit} more chars]"


_installed = False


def install_log_redaction() -> None:
    """Scrub every log record made from now on, whichever handler writes it (idempotent): the
    message is formatted and scrubbed when the record is made, and so is an exception's text."""
    global _installed
    if _installed:
        return
    _installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            msg = record.getMessage()
        except Exception:  # a bad format string: logging reports it as usual
            return record
        record.msg, record.args = scrub(msg), None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(factory)


_CREDENTIAL_NAME = re.compile(r"(?i)auth|key|token|secret|cookie|pass|sig")


def secrets_of(config: Any) -> list[str]:
    """Every secret in a gateway config: deployment keys, credential-looking headers, base_url
    credentials, the master key."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    out: list[str | None] = [getattr(config.server, "master_key", None)]
    for m in config.models:
        for d in m.deployments:
            out.append(getattr(d, "api_key", None))
            for name, value in (getattr(d, "headers", None) or {}).items():
                if _CREDENTIAL_NAME.search(name):
                    out.append(value)
                    out.append(value.split(" ", 1)[-1])
            url = getattr(d, "base_url", None)
            if url:
                parts = urlsplit(url)
                out += [unquote(parts.password or ""), parts.password]
                out += [v for k, v in parse_qsl(parts.query) if _CREDENTIAL_NAME.search(k) or len(v) >= 20]
    return [s for s in out if s]
