"""Regression (issue 9, section 3): unauthenticated requests filled memory and disk through the
request log (a 16 MiB model name became a 16 MiB row). Logged strings that come from callers or
upstreams are now bounded: names to 256 characters, errors to 2000 (``observability.request_log``)."""

from __future__ import annotations

from typing import Any

import aiohttp

from kaiyuan.testing.fake_openai import FakeOpenAI
from tests.conftest import openai_model


async def test_huge_model_names_make_small_log_rows(make_gateway: Any, fake_openai: FakeOpenAI) -> None:
    gw = make_gateway({"server": {"master_key": "sk-master-key"}, "models": [openai_model("m", fake_openai.url)]})
    huge = "x" * 2_000_000
    body = {"model": huge, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer sk-master-key"}):
            async with s.post(gw.base_url + "/chat/completions", json=body, headers=headers) as r:
                assert r.status in (401, 404)
    rows = gw.log_rows()
    assert len(rows) == 3
    for row in rows:
        assert len(row["model"] or "") < 300  # None: refused before the body was read (no key)
        assert row["error"] is None or len(row["error"]) < 2100
        assert sum(len(str(v)) for v in row.values()) < 5000
    assert fake_openai.requests == []
