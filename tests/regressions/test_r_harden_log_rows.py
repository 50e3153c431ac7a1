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


async def test_a_404_echoes_at_most_256_characters_of_the_model_name(make_gateway: Any, fake_openai: FakeOpenAI) -> None:
    """The 404 for an unknown model quotes its name cut as the log cuts it, in every dialect."""
    gw = make_gateway({"models": [openai_model("m", fake_openai.url)]})
    huge = "y" * 2_000_000
    msgs = [{"role": "user", "content": "hi"}]
    async with aiohttp.ClientSession() as s:
        for path, body in (("/v1/chat/completions", {"model": huge, "messages": msgs}),
                           ("/v1/messages", {"model": huge, "max_tokens": 5, "messages": msgs}),
                           ("/v1/responses", {"model": huge, "input": "hi"})):
            async with s.post(gw.url + path, json=body) as r:
                assert r.status == 404
                text = await r.text()
            assert len(text) < 2000, path
            assert "y" * 256 + f"...[{len(huge) - 256} more chars]" in text and "y" * 257 not in text
        async with s.get(gw.url + "/v1/models/" + "z" * 4000) as r:
            assert r.status == 404
            text = await r.text()
        assert len(text) < 2000 and "z" * 256 + "...[3744 more chars]" in text
    rows = gw.log_rows()
    assert len(rows) == 3 and all(len(r["error"]) < 2100 and len(r["model"]) < 300 for r in rows)
