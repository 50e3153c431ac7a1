"""`kaiyuan serve` as an operator runs it, `kaiyuan logs`, and the Prometheus metrics."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import aiohttp
import openai

from kaiyuan.testing.harness import GatewayProcess, RunningGateway
from tests.conftest import openai_model


async def test_serve_logs_and_metrics(fake_openai: Any, tmp_path: Any) -> None:
    db = f"sqlite:///{tmp_path}/k.db"
    gw = GatewayProcess({"store": {"url": db}, "request_log": {"flush_interval_s": 0.1},
                         "models": [openai_model("deepseek-chat", fake_openai.url)]}, str(tmp_path))
    try:
        gw.wait_ready()
        c = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        r = await c.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "from the cli test"}])
        assert r.choices[0].message.content == "echo: from the cli test"
        await c.close()
        async with aiohttp.ClientSession() as s:
            # The request is counted just after its answer, and with two workers a scrape served by
            # the other one sees it within metrics sync interval (1 s, docs/scaling.md): poll briefly.
            for _ in range(50):
                async with s.get(gw.url + "/metrics") as m:
                    text = await m.text()
                if 'kind="prompt"' in text and 'status="200"} 1.0' in text:
                    break
                await asyncio.sleep(0.1)
            async with s.get(gw.url + "/readyz") as rz:
                assert rz.status == 200
    finally:
        assert gw.stop() == 0  # SIGTERM: clean shutdown, log flushed
    assert 'kaiyuan_requests_total{deployment="openai_compatible:deepseek-chat@127.0.0.1' in text
    assert "kaiyuan_request_duration_seconds_bucket" in text
    assert 'kaiyuan_tokens_total{deployment=' in text and 'kind="prompt"' in text
    out = subprocess.run([sys.executable, "-m", "kaiyuan", "logs", "--config", gw.config_path], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "deepseek-chat" in out.stdout and " 200 " in out.stdout


def test_metrics_count_upstream_errors(gateway: RunningGateway, fake_openai: Any) -> None:
    from kaiyuan.testing.fake_openai import Behaviour

    fake_openai.next(Behaviour(status=503))
    c = openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
    try:
        c.chat.completions.create(model="fake-chat", messages=[{"role": "user", "content": "x"}])
    except openai.APIStatusError:
        pass
    gateway.settle()  # the answer may reach the client before the request is recorded
    text = gateway.gateway.metrics.render().decode()
    assert 'kaiyuan_upstream_errors_total{deployment="openai_compatible:upstream-chat' in text and 'kind="503"' in text


def test_models_and_check_commands(tmp_path: Any) -> None:
    p = tmp_path / "k.yaml"
    p.write_text("models:\n  - name: qwen\n    deployments:\n      - {provider: openai_compatible, model: qwen-plus, base_url: 'https://dashscope.aliyuncs.com/compatible-mode/v1'}\n")
    out = subprocess.run([sys.executable, "-m", "kaiyuan", "models", "--config", str(p)], capture_output=True, text=True, timeout=60)
    assert "qwen" in out.stdout and "dashscope" in out.stdout
    out = subprocess.run([sys.executable, "-m", "kaiyuan", "check", "--config", str(p)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "configuration OK" in out.stdout


def test_unknown_model_names_do_not_grow_metric_series(gateway: RunningGateway) -> None:
    c = openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
    for i in range(5):
        try:
            c.chat.completions.create(model=f"made-up-{i}", messages=[{"role": "user", "content": "x"}])
        except openai.NotFoundError:
            pass
    text = gateway.gateway.metrics.render().decode()
    assert "made-up-" not in text
    assert 'model="(unknown)"' in text and 'status="404"' in text
