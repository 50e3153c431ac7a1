"""Offline trial input: a JSONL dataset, or requests replayed from the request log.

Each line is one JSON object: either a chat request (``{"messages": [...]}``) or
``{"id": ..., "request": {...}, "reference": ..., "schema": ..., "tool_call": ..., "trace": ...}``
(``trace``: a multi-turn agent conversation, see :mod:`kaiyuan.trials.agent`). Extra keys
are kept on the item for scorers. A bad line fails the load with its line number.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine, select

from kaiyuan.store.schema import request_log
from kaiyuan.trials.regex_match import check_pattern

ITEM_KEYS = ("id", "request", "reference", "schema", "tool_call", "pattern", "policy", "trace")


class DatasetError(ValueError):
    """The dataset cannot be used; the message names the file and line."""


@dataclass
class Item:
    id: str
    request: dict[str, Any]
    meta: dict[str, Any]  # reference / schema / tool_call / anything else, for scorers


def replay_key(seed: int, item_id: str) -> bytes:
    """The item's place in the seeded random replay order: a hash of (seed, id), so the order is
    reproducible from the ids alone (the report re-sorts stored results with it) and independent
    of every outcome, which is what the confidence sequence needs."""
    return hashlib.blake2b(f"{seed}\0{item_id}".encode(), digest_size=8).digest()


def replay_order(items: list[Item], seed: int) -> list[Item]:
    """``items`` in the seeded random order (ties between repeated ids keep dataset order)."""
    return sorted(items, key=lambda it: replay_key(seed, it.id))


def parse_line(obj: Any, where: str, index: int) -> Item:
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "request" in obj:
        req, meta = obj["request"], {k: v for k, v in obj.items() if k != "request"}
    else:
        req = {k: v for k, v in obj.items() if k not in ITEM_KEYS}
        meta = {k: v for k, v in obj.items() if k in ITEM_KEYS}
    if not isinstance(req, dict):
        raise DatasetError(f"{where}: 'request' must be a JSON object")
    msgs = req.get("messages")
    if not (isinstance(msgs, list) and msgs):
        raise DatasetError(f"{where}: the request needs a non-empty 'messages' list")
    pattern = meta.get("pattern")
    if pattern is not None:  # a regex scorer's pattern for this item: checked now, not at scoring time
        if not isinstance(pattern, str):
            raise DatasetError(f"{where}: 'pattern' must be a string (a regular expression)")
        try:
            check_pattern(pattern)
        except ValueError as e:
            raise DatasetError(f"{where}: 'pattern': {e}") from None
    if "trace" in meta:
        from kaiyuan.trials.agent import TraceError, parse_trace

        try:
            parse_trace(meta["trace"])
        except TraceError as e:
            raise DatasetError(f"{where}: {e}") from None
    return Item(str(obj.get("id", index)), req, meta)


def load_jsonl(path: str | Path) -> list[Item]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{p}: dataset file not found") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    items: list[Item] = []
    errors: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            errors.append(f"{where}: not valid JSON: {e}")
            continue
        try:
            items.append(parse_line(obj, where, lineno))
        except DatasetError as e:
            errors.append(str(e))
    if errors:
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise DatasetError(f"{p}: {len(errors)} bad line(s):\n  " + "\n  ".join(errors[:10]) + more)
    if not items:
        raise DatasetError(f"{p}: the dataset is empty (no JSON lines); nothing to replay")
    return items


def from_request_log(engine: Engine, model: str, limit: int = 1000) -> list[Item]:
    """Chat requests to ``model`` whose bodies were logged (the model needs ``log_bodies: true``)."""
    t = request_log
    q = (select(t.c.id, t.c.request_body, t.c.policy).where(t.c.model == model, t.c.endpoint == "chat", t.c.status < 400,
                                                t.c.request_body.is_not(None)).order_by(t.c.ts.desc()).limit(limit))
    items = []
    with engine.connect() as conn:
        for rid, body, policy in conn.execute(q):
            try:
                req = orjson.loads(body)
            except orjson.JSONDecodeError:
                continue
            if isinstance(req, dict) and req.get("messages"):
                req.pop("stream", None)
                req.pop("stream_options", None)
                items.append(Item(str(rid), req, {"policy": policy} if policy else {}))
    if not items:
        raise DatasetError(f"the request log has no logged chat requests for model {model!r} "
                           f"(set log_bodies: true on the model to record them)")
    return items
