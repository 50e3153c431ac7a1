"""A missing model file or runtime never stops the gateway: the model is listed as unavailable, with a fix."""

from __future__ import annotations

import aiohttp
import openai
import pytest


async def test_missing_model_file_is_listed_as_unavailable(make_gateway, fake_openai, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import openai_model

    gw = make_gateway({"models": [
        {"name": "broken-local", "deployments": [{"provider": "local", "path": str(tmp_path / "nope.gguf")}]},
        openai_model("m", fake_openai.url),
    ]})
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/v1/models") as r:
            models = {m["id"]: m for m in (await r.json())["data"]}
        async with s.get(gw.url + "/readyz") as r:
            assert r.status == 200  # another model is usable
            ready = await r.json()
    assert models["broken-local"]["available"] is False
    assert "does not exist" in models["broken-local"]["unavailable_reason"]
    assert "broken-local" in ready["models_unavailable"]
    c = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model="broken-local", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 503 and "does not exist" in e.value.message


async def test_readyz_is_503_when_nothing_is_usable(make_gateway, tmp_path) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway({"models": [{"name": "l", "deployments": [{"provider": "local", "path": str(tmp_path / "x.gguf")}]}]})
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/readyz") as r:
        assert r.status == 503
        assert (await r.json())["reason"] == "no configured model has a usable deployment"
