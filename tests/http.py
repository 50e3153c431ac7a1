"""A tiny HTTP client for admin-API tests (stdlib only)."""

from __future__ import annotations

import json as jsonlib
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any


@dataclass
class Reply:
    status_code: int
    text: str
    headers: dict[str, str]

    def json(self) -> Any:
        return jsonlib.loads(self.text)


def http(method: str, url: str, json: Any = None, key: str | None = None, raw: bytes | None = None) -> Reply:
    data = raw if raw is not None else (jsonlib.dumps(json).encode() if json is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return Reply(resp.status, resp.read().decode(), {k.lower(): v for k, v in resp.headers.items()})
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.read().decode(), {k.lower(): v for k, v in e.headers.items()})
