"""Shared setup for the budget regression tests (issue 9, section 2): a real gateway on 127.0.0.1
with a master key, priced models on the fake upstreams, virtual keys with budgets, and the spend
ledger read back in exact money (Decimal, to the nano-dollar the counters use)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import anthropic
import openai
from sqlalchemy import select

from kaiyuan.store.schema import spend_ledger
from kaiyuan.testing.harness import RunningGateway
from tests.http import Reply, http

MASTER = "sk-master-budget-regressions"
NANO = Decimal("0.000000001")


UPSTREAM = {"openai_compatible": ("/v1", "sk-upstream"), "anthropic": ("", "sk-ant-upstream"),
            "gemini": ("/v1beta", "gm-upstream")}


def priced(name: str, url: str, upstream: str, inp: float, out: float, max_out: int | None = None,
           protocol: str = "openai_compatible", dep: dict[str, Any] | None = None, **routing: Any) -> dict[str, Any]:
    """A model with one deployment on a fake upstream (``protocol``), priced per million tokens."""
    price: dict[str, Any] = {"input": inp, "output": out}
    if max_out is not None:
        price["max_output_tokens"] = max_out
    path, key = UPSTREAM[protocol]
    d = {"provider": protocol, "base_url": url + path, "model": upstream, "api_key": key, "price": price, **(dep or {})}
    m: dict[str, Any] = {"name": name, "deployments": [d]}
    if routing:
        m["routing"] = routing
    return m


def admin(gw: RunningGateway, method: str, path: str, json: Any = None) -> Reply:
    return http(method, gw.url + path, json, MASTER)


def new_key(gw: RunningGateway, **body: Any) -> dict[str, Any]:
    r = admin(gw, "POST", "/admin/keys", {"name": "k", **body})
    assert r.status_code == 201, r.text
    return r.json()


def oai(gw: RunningGateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0)


def anth(gw: RunningGateway, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)


def ledger(gw: RunningGateway, key_id: str | None = None) -> list[dict[str, Any]]:
    """The spend ledger rows (written out first), oldest first."""
    gw.settle()
    gw.servers.call(gw.gateway.ledger.flush())
    assert gw.gateway.engine is not None
    q = select(spend_ledger).order_by(spend_ledger.c.ts)
    if key_id is not None:
        q = q.where(spend_ledger.c.key_id == key_id)
    with gw.gateway.engine.connect() as conn:
        return [dict(r) for r in conn.execute(q).mappings()]


def usd(v: float | str | Decimal) -> Decimal:
    return Decimal(str(v)).quantize(NANO)


def cost(prompt: int, completion: int, inp: float, out: float) -> Decimal:
    """The exact cost of a usage at per-million prices, to the nano-dollar."""
    return ((Decimal(prompt) * Decimal(str(inp)) + Decimal(completion) * Decimal(str(out))) / Decimal(10**6)).quantize(NANO)


def budget(gw: RunningGateway, key_id: str) -> dict[str, Any]:
    """The key's one budget as the admin API reports it (spent and reserved, live)."""
    rows = [b for b in admin(gw, "GET", "/admin/budgets").json()["data"] if b["scope_id"] == key_id]
    assert len(rows) == 1, rows
    return rows[0]
