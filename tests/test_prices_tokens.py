"""The price catalog, cost arithmetic and offline token counting."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kaiyuan.accounting.output_cap import OutputAsk, asked
from kaiyuan.accounting.price_schema import Price
from kaiyuan.accounting.prices import CATALOG_PATH, PriceCatalog, deployment_price, resolve
from kaiyuan.accounting.tokens import count_prompt, counter_for, estimate_tokens
from kaiyuan.config import AccountingSettings, ConfigError, OpenAICompatibleDeployment, parse_config
from kaiyuan.context import Usage


def test_every_catalog_row_names_its_source_and_date() -> None:
    data = yaml.safe_load(CATALOG_PATH.read_text())
    assert data["version"]
    vendors = set()
    for row in data["models"]:
        assert row["source"].startswith("http") and row["read"] and isinstance(row["verified"], bool), row
        vendors.add(row["vendor"])
    assert {"deepseek", "alibaba", "zhipu", "moonshot", "openai", "anthropic", "google"} <= vendors


def test_lookup_exact_prefix_and_vendor_prefix() -> None:
    cat = PriceCatalog.load()
    ds = cat.lookup("deepseek-chat")
    assert ds is not None and ds.base.input == pytest.approx(0.27e-6) and ds.base.cache_hit == pytest.approx(0.07e-6)
    assert cat.lookup("claude-sonnet-4-5-20250929") is not None  # dated snapshot via prefix
    assert cat.lookup("deepseek-ai/deepseek-chat") is ds
    assert cat.lookup("gemini-2.5-flash-lite-preview") is not cat.lookup("gemini-2.5-flash")  # longest prefix wins
    assert cat.lookup("my-private-model") is None
    turbo, k2 = cat.lookup("kimi-k2-turbo-preview"), cat.lookup("kimi-k2-0905-preview")
    assert turbo is not None and k2 is not None and turbo.base.output > k2.base.output  # turbo is not priced as kimi-k2


def test_verified_rows_say_what_was_read() -> None:
    """A verified row must carry a note naming what was read; unverified rows say why not."""
    for row in yaml.safe_load(CATALOG_PATH.read_text())["models"]:
        assert isinstance(row.get("note"), str) and row["note"], row["names"]


def test_cost_with_cache_tiers_and_cny() -> None:
    cat = PriceCatalog.load()
    ds = cat.lookup("deepseek-chat")
    assert ds is not None
    # 1M prompt of which 400k cached, 100k out: 0.6*0.27 + 0.4*0.07 + 0.1*1.10
    assert ds.cost(Usage(1_000_000, 100_000, 400_000)) == pytest.approx(0.162 + 0.028 + 0.11)
    gem = cat.lookup("gemini-2.5-pro")
    assert gem is not None
    short = gem.cost(Usage(100_000, 0))
    long = gem.cost(Usage(300_000, 0))
    assert short == pytest.approx(0.125) and long == pytest.approx(0.75)  # the >200k tier
    cny = resolve(Price(input=7.1, output=14.2, currency="CNY"), 7.1, None, "t")
    assert cny.cost(Usage(1_000_000, 1_000_000)) == pytest.approx(3.0)
    assert ds.cost(Usage()) is None  # no usage: unknown, not 0
    assert ds.worst_case(1000, 500) == pytest.approx(1000 * 0.27e-6 + 500 * 1.10e-6)


def test_config_price_overrides_the_catalog_and_stays_dict_compatible() -> None:
    cfg = parse_config(
        {"models": [{"name": "m", "deployments": [{"provider": "openai_compatible", "base_url": "http://x/v1",
                                                    "model": "deepseek-chat", "price": {"input": 1, "output": 2, "currency": "CNY"}}]}]}
    )
    dep = cfg.models[0].deployments[0]
    assert isinstance(dep, OpenAICompatibleDeployment) and dep.price is not None
    assert dep.price["input"] == 1 and dep.price.get("output") == 2 and dep.price.get("cache_hit") is None
    assert "input" in dep.price and isinstance(dep.price, dict)
    p = deployment_price(dep, PriceCatalog.load())
    assert p is not None and p.source == "config" and p.base.input == pytest.approx(1 / 7.1 / 1e6)
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [{"name": "m", "deployments": [{"provider": "openai_compatible", "base_url": "http://x/v1",
                                                                 "model": "x", "price": {"input": -1, "output": 2}}]}]})
    assert "deployments[0].price" in str(e.value) and "price.input must be a number >= 0" in str(e.value)
    cfg = parse_config({"models": [{"name": "m", "deployments": [{"provider": "openai_compatible", "base_url": "http://x/v1",
                                                                   "model": "x", "price": {"input": 1, "output": 2, "cached_input": 0.5}}]}]})
    price = cfg.models[0].deployments[0].price
    assert price == {"input": 1.0, "output": 2.0, "cached_input": 0.5, "currency": "USD"}  # a plain dict
    cheap = deployment_price(cfg.models[0].deployments[0], PriceCatalog.load())
    assert cheap is not None and cheap.base.cache_hit == pytest.approx(0.5e-6)  # cached_input is the cache-hit price
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [{"name": "m", "deployments": [{"provider": "openai_compatible", "base_url": "http://x/v1",
                                                                 "model": "x", "price": {"input": 1}}]}]})
    assert "price needs 'output'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [{"name": "m", "deployments": [{"provider": "openai_compatible", "base_url": "http://x/v1",
                                                                 "model": "x", "price": {"input": 1, "output": 1, "currency": "EUR"}}]}]})
    assert "USD or CNY" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [{"name": "m", "deployments": [{"provider": "openai_compatible", "base_url": "http://x/v1",
                                                                 "model": "x", "price": {"input": 1, "output": 1, "tiers": [{"input": 1}]}}]}]})
    assert "price.tiers.0.above_tokens" in str(e.value)


def test_extra_prices_file_wins(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump({"models": [{"names": ["deepseek-chat"], "input": 9, "output": 9, "source": "s", "read": "d"}]}))
    cat = PriceCatalog.load(AccountingSettings(prices_file=str(f)))
    p = cat.lookup("deepseek-chat")
    assert p is not None and p.base.input == pytest.approx(9e-6)
    f.write_text("models: [{names: [x], input: -3, output: 1}]")
    with pytest.raises(ConfigError):
        PriceCatalog.load(AccountingSettings(prices_file=str(f)))


def test_tokenizers_are_offline_and_exact() -> None:
    o200k, name = counter_for("gpt-4o")
    assert name == "o200k_base" and o200k("hello world") == 2
    cl, name = counter_for("gpt-4-turbo")
    assert name == "cl100k_base" and cl("hello world") == 2
    import quicktok

    assert list(quicktok.get_encoding("cl100k_base").encode("hello world")) == [15339, 1917]  # tiktoken's ids
    assert list(quicktok.get_encoding("o200k_base").encode("hello world")) == [24912, 2375]
    _qwen, name = counter_for("Qwen/Qwen3-8B")
    assert name == "qwen3"
    _est, name = counter_for("deepseek-chat")
    assert name == "estimate"
    assert estimate_tokens("abcdef") == 3 and estimate_tokens("开源") == 3


def test_count_prompt_and_output_cap() -> None:
    body = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hello world"}]}]}
    n = count_prompt("gpt-4o", body)
    assert n == 2 + 2 + 2 * 4 + 3
    anthropic = {"system": "be brief", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 100}
    assert count_prompt("claude-sonnet-4", anthropic) > 0
    assert asked({"max_tokens": 100, "n": 3}, "chat") == OutputAsk(100, 3)
    assert asked({"max_completion_tokens": 7, "max_tokens": 100}, "chat").cap == 7
    assert asked({}, "chat").cap is None and asked({}, "embeddings") == OutputAsk(0, 1)
    assert asked({"max_tokens": True, "n": "3"}, "chat") == OutputAsk(None, 1)


def test_cache_writes_are_part_of_the_prompt() -> None:
    sonnet = PriceCatalog.load().lookup("claude-sonnet-4-5")
    assert sonnet is not None
    # 1000 prompt tokens = 500 uncached + 200 cache hits + 300 cache writes
    cost = sonnet.cost(Usage(prompt_tokens=1000, completion_tokens=10, cached_tokens=200, cache_write_tokens=300))
    assert cost == pytest.approx((500 * 3 + 200 * 0.30 + 300 * 3.75 + 10 * 15) / 1e6)
