"""Stored Responses API responses: written behind the request, readable by the very next request.

The hot-path rule is "no database write on the request path", yet a client may send
``previous_response_id`` the moment the previous response ended. So a finished response goes into a
bounded in-memory table of pending rows (this replica reads it from there at once) and a background
task writes pending rows in batches every ``flush_interval_s`` (default 50 ms). Another replica
sharing the database finds the row once that batch is written: on a miss it looks again after two
flush intervals before answering 404, so a client that hops replicas within a few milliseconds of
the previous answer still finds it. A crash loses at most the pending rows (one interval).

Rows are scoped to the key that made them and expire after ``retention_days``; expired rows are
invisible at once and deleted by the writer. Like request-log bodies, every string in them is
scrubbed of secrets (:mod:`kaiyuan.redact`) before it is kept, except sealed reasoning blobs (opaque,
and already encrypted).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Engine, delete, insert, select

from kaiyuan import background
from kaiyuan.config import ResponsesSettings
from kaiyuan.redact import scrub
from kaiyuan.store.schema import responses

log = logging.getLogger("kaiyuan.responses")
PURGE_EVERY_S = 60.0
OPAQUE = frozenset({"encrypted_content"})


def scrubbed(node: Any) -> Any:
    """``node`` with every string scrubbed of secrets, except the values of :data:`OPAQUE` keys."""
    if isinstance(node, str):
        return scrub(node)
    if isinstance(node, dict):
        return {k: v if k in OPAQUE else scrubbed(v) for k, v in node.items()}
    if isinstance(node, list):
        return [scrubbed(v) for v in node]
    return node


@dataclass(slots=True)
class Stored:
    id: str
    key_id: str | None
    created_at: float
    expires_at: float
    model: str | None
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    history: list[dict[str, Any]]

    def row(self) -> dict[str, Any]:
        return {"id": self.id, "key_id": self.key_id, "created_at": self.created_at, "expires_at": self.expires_at,
                "model": self.model, "response": orjson.dumps(self.response).decode(),
                "input_items": orjson.dumps(self.input_items).decode(), "history": orjson.dumps(self.history).decode()}


def _from_row(r: Any) -> Stored:
    return Stored(r.id, r.key_id, r.created_at, r.expires_at or float("inf"), r.model, orjson.loads(r.response),
                  orjson.loads(r.input_items), orjson.loads(r.history))


class ResponseStore:
    def __init__(self, engine: Engine | None, settings: ResponsesSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.retention_s = settings.retention_days * 86400
        self.pending: OrderedDict[str, Stored] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._last_purge = 0.0
        self.dropped = 0

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self.engine is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        await background.stop(self._task)
        self._task = None
        await self.flush()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()  # idle until something is pending: no wake-ups on a quiet gateway
            await asyncio.sleep(self.settings.flush_interval_s)  # then gather a batch
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # the database is down: rows stay pending (bounded) and are retried
                log.exception("writing stored responses failed; %d pending", len(self.pending))
            if self.pending:
                self._wake.set()

    async def flush(self) -> None:
        if self.engine is None or not self.pending:
            return
        batch = list(self.pending.values())
        rows = [s.row() for s in batch]
        purge = time.time() - self._last_purge > PURGE_EVERY_S
        await asyncio.to_thread(self._write, rows, purge)
        if purge:
            self._last_purge = time.time()
        for s in batch:
            if self.pending.get(s.id) is s:
                del self.pending[s.id]

    def _write(self, rows: list[dict[str, Any]], purge: bool) -> None:
        assert self.engine is not None
        with self.engine.begin() as conn:
            conn.execute(delete(responses).where(responses.c.id.in_([r["id"] for r in rows])))
            conn.execute(insert(responses), rows)
            if purge:
                conn.execute(delete(responses).where(responses.c.expires_at < time.time()))

    # -- the API ------------------------------------------------------------------------------
    def put(self, resp_id: str, key_id: str | None, model: str | None, response: dict[str, Any],
            input_items: list[dict[str, Any]], history: list[dict[str, Any]], output: list[dict[str, Any]]) -> bool:
        """Keep a finished response (no I/O): its conversation is ``history`` (a stored one, already
        scrubbed), then ``input_items`` and ``output``. False when the pending table is full (not stored)."""
        if len(self.pending) >= self.settings.max_pending:
            self.dropped += 1
            log.error("stored responses: %d waiting to be written (database down?); response %s not stored",
                      len(self.pending), resp_id)
            return False
        now = time.time()
        items = scrubbed(input_items)  # only what is new is scrubbed: the cost does not grow with the conversation
        self.pending[resp_id] = Stored(resp_id, key_id, now, now + self.retention_s, model, scrubbed(response),
                                       items, history + items + scrubbed(output))
        self._wake.set()
        return True

    async def get(self, resp_id: str, key_id: str | None, wait_for_peers: bool = True) -> Stored | None:
        """The response ``resp_id`` made by ``key_id``, or None (unknown, another key's, expired, deleted)."""
        s = self.pending.get(resp_id)
        if s is None and self.engine is not None:
            s = await asyncio.to_thread(self._read, resp_id)
            if s is None and wait_for_peers:  # another replica may be writing it this very moment
                await asyncio.sleep(2 * self.settings.flush_interval_s)
                s = self.pending.get(resp_id) or await asyncio.to_thread(self._read, resp_id)
        if s is None or s.key_id != key_id or s.expires_at < time.time():
            return None
        return s

    def _read(self, resp_id: str) -> Stored | None:
        assert self.engine is not None
        with self.engine.connect() as conn:
            r = conn.execute(select(responses).where(responses.c.id == resp_id)).first()
        return _from_row(r) if r is not None else None

    async def delete(self, resp_id: str, key_id: str | None) -> bool:
        s = await self.get(resp_id, key_id, wait_for_peers=False)
        if s is None:
            return False
        self.pending.pop(resp_id, None)
        if self.engine is not None:
            await asyncio.to_thread(self._delete, resp_id)
        return True

    def _delete(self, resp_id: str) -> None:
        assert self.engine is not None
        with self.engine.begin() as conn:
            conn.execute(delete(responses).where(responses.c.id == resp_id))
