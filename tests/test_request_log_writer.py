"""The request log writer's SQLite fast path writes exactly what SQLAlchemy's insert writes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from sqlalchemy import select

from kaiyuan.config import RequestLogSettings
from kaiyuan.context import Attempt, RequestContext
from kaiyuan.observability.metrics import Metrics
from kaiyuan.observability.request_log import RequestLogWriter, row_for
from kaiyuan.store.db import open_store
from kaiyuan.store.schema import request_log


def _ctx(i: int) -> RequestContext:
    c = RequestContext(f"req_{i:04d}", "openai", "chat")
    c.model = "m"
    c.deployment = "dep-a" if i % 2 else None
    c.status = 200 if i % 3 else 499
    c.stream = bool(i % 2)
    c.cancelled = i % 3 == 0
    c.error = None if i % 3 else "client disconnected"
    c.usage.prompt_tokens = i
    c.usage.cached_tokens = None if i % 2 else 0
    c.cost_usd = None if i % 2 else 0.25
    c.ttft = None if i % 2 else 0.012
    c.attempts.append(Attempt("dep-a", 200, None, 1.5))
    c.log_bodies = i == 1
    c.raw_body = b'{"model":"m"}'
    c.response_body = b"{}" if i == 1 else None
    return c


def _rows(url: str) -> list[dict[str, Any]]:
    engine = open_store(url)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(request_log).order_by(request_log.c.id)).mappings()]


def test_sqlite_fast_path_matches_sqlalchemy_insert(tmp_path: Path) -> None:
    fast_url, ref_url = f"sqlite:///{tmp_path}/fast.db", f"sqlite:///{tmp_path}/ref.db"
    writer = RequestLogWriter(open_store(fast_url), RequestLogSettings(batch_size=4), Metrics().store)
    for i in range(10):
        writer.submit(_ctx(i))
    queued = [dict(r) for r in writer.writer._queue]  # the same rows, written the reference way
    assert asyncio.run(writer.flush()) == 10
    ref = open_store(ref_url)
    with ref.begin() as conn:
        conn.execute(request_log.insert(), queued)
    fast, expected = _rows(fast_url), _rows(ref_url)
    assert len(fast) == 10
    assert fast == expected
    assert fast[0]["cancelled"] is True and fast[1]["stream"] is True and fast[1]["response_body"] == "{}"


def test_incomplete_rows_fall_back_to_sqlalchemy_defaults(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/partial.db"
    writer = RequestLogWriter(open_store(url), RequestLogSettings(), Metrics().store)
    rows = [row_for(_ctx(i)) for i in (1, 2)]
    for r in rows:
        del r["stream"], r["attempts"]  # columns with Python-side defaults only SQLAlchemy fills
    writer._write(rows)
    got = _rows(url)
    assert [r["id"] for r in got] == ["req_0001", "req_0002"]
    assert all(r["stream"] is False and r["attempts"] == 1 for r in got)


def test_a_huge_error_is_scrubbed_only_up_to_its_cut(monkeypatch: Any) -> None:
    """A multi-megabyte error string is cut to MAX_ERROR_CHARS, and only its head (plus a margin) is
    scrubbed: scrubbing all of it took the event loop ~0.15 s per MiB. A secret that straddles the
    cut is still masked."""
    from kaiyuan import redact
    from kaiyuan.observability.request_log import MAX_ERROR_CHARS

    seen: list[int] = []
    real = redact.scrub

    def spy(text: str) -> str:
        seen.append(len(text))
        return real(text)

    monkeypatch.setattr(redact, "scrub", spy)
    key = "sk-proj-" + "A1b2C3d4E5f6G7h8I9j0" * 3
    c = _ctx(2)
    c.error = "e" * (MAX_ERROR_CHARS - 10) + key + "e" * (4 << 20)
    c.attempts.clear()
    row = row_for(c)
    assert max(seen) <= MAX_ERROR_CHARS + redact.CLIP_MARGIN
    assert key not in row["error"] and key[:12] not in row["error"]
    assert row["error"].startswith("e" * (MAX_ERROR_CHARS - 10)) and len(row["error"]) < MAX_ERROR_CHARS + 64
