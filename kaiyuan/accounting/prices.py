"""The price catalog (``kaiyuan/data/prices.yaml``), per-deployment prices and the cost of a request.

Prices are per million tokens. A deployment's ``price:`` in config wins over the catalog; the
catalog is looked up by the upstream model id (exact, then the longest ``prefix*`` row). A model
with no price has cost ``None`` ("unknown"), never 0.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kaiyuan.accounting.price_schema import Price
from kaiyuan.config import AccountingSettings, ConfigError, DeploymentBase
from kaiyuan.context import Usage

log = logging.getLogger("kaiyuan.accounting")

CATALOG_PATH = Path(__file__).resolve().parent.parent / "data" / "prices.yaml"
_ROW_META = ("names", "vendor", "source", "read", "verified", "note")


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per token (already converted and divided by a million), for one context-length tier."""

    input: float
    output: float
    cache_hit: float
    cache_write: float


@dataclass(frozen=True, slots=True)
class ResolvedPrice:
    """A price ready to use: USD per token, tiers sorted, with where it came from."""

    base: Rates
    tiers: tuple[tuple[int, Rates], ...]  # (above_tokens, rates), ascending
    max_output_tokens: int | None
    vendor: str | None
    source: str

    def rates_for(self, prompt_tokens: int) -> Rates:
        r = self.base
        for above, tier in self.tiers:
            if prompt_tokens > above:
                r = tier
        return r

    def cost(self, usage: Usage) -> float | None:
        """USD for this usage, or None when the usage is unknown."""
        p = usage.prompt_tokens
        c = usage.completion_tokens
        if p is None and c is None:
            return None
        p = p or 0
        c = c or 0
        # prompt_tokens is the whole prompt: uncached + cache hits (cached_tokens) + cache writes.
        # (Each at most what is left of it; comparisons, not min(): every priced request runs this.)
        cached = usage.cached_tokens or 0
        if cached > p:
            cached = p
        written = usage.cache_write_tokens or 0
        if written > p - cached:
            written = p - cached
        r = self.rates_for(p) if self.tiers else self.base
        return (p - cached - written) * r.input + cached * r.cache_hit + written * r.cache_write + c * r.output

    def charges_output(self) -> bool:
        return self.base.output > 0 or any(r.output > 0 for _above, r in self.tiers)

    def worst_case(self, prompt_tokens: int, max_output: int) -> float:
        """Upper bound: every prompt token uncached (or written to the cache), ``max_output`` out."""
        r = self.rates_for(prompt_tokens)
        return prompt_tokens * max(r.input, r.cache_write) + max_output * r.output


def _rates(price: Price | dict[str, Any], usd_per_unit: float) -> Rates:
    g = price.get
    inp = float(g("input") or 0.0)
    k = usd_per_unit / 1_000_000
    hit = g("cache_hit")
    write = g("cache_write")
    return Rates(
        input=inp * k,
        output=float(g("output") or 0.0) * k,
        cache_hit=(inp if hit is None else float(hit)) * k,
        cache_write=(inp if write is None else float(write)) * k,
    )


def resolve(price: Price, cny_per_usd: float, vendor: str | None, source: str) -> ResolvedPrice:
    unit = 1.0 if price.currency == "USD" else 1.0 / cny_per_usd
    base = _rates(price, unit)
    tiers = []
    for t in sorted(price.tiers, key=lambda t: t.above_tokens):
        td = t.model_dump()
        if td.get("cache_hit") is None:
            td["cache_hit"] = price.cache_hit if price.cache_hit is not None else None
        tiers.append((t.above_tokens, _rates(td, unit)))
    return ResolvedPrice(base, tuple(tiers), price.max_output_tokens, vendor, source)


class PriceCatalog:
    """The bundled catalog plus an optional extra file; ``lookup`` by upstream model id."""

    def __init__(self, rows: list[dict[str, Any]], version: str, cny_per_usd: float) -> None:
        self.version = version
        self.cny_per_usd = cny_per_usd
        self.rows = rows
        self._exact: dict[str, ResolvedPrice] = {}
        self._prefix: list[tuple[str, ResolvedPrice]] = []
        for row in rows:
            resolved = resolve(_row_price(row), cny_per_usd, row.get("vendor"), f"catalog {version}: {row.get('source')}")
            for name in row["names"]:
                n = str(name).lower()
                if n.endswith("*"):
                    self._prefix.append((n[:-1], resolved))
                else:
                    self._exact.setdefault(n, resolved)  # the first row that names a model wins
        self._prefix.sort(key=lambda x: -len(x[0]))

    @classmethod
    def load(cls, settings: AccountingSettings | None = None) -> PriceCatalog:
        settings = settings or AccountingSettings.model_validate({})
        data = _read_yaml(CATALOG_PATH)
        rows = list(data.get("models") or [])
        version = str(data.get("version", "?"))
        if settings.prices_file:
            extra = _read_yaml(Path(settings.prices_file))
            rows = list(extra.get("models") or []) + rows  # first match wins: the extra file
            version += f"+{Path(settings.prices_file).name}"
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or not row.get("names"):
                raise ConfigError(f"price catalog: row {i} needs 'names'")
            try:
                _row_price(row)
            except ValidationError as e:
                raise ConfigError(f"price catalog: row {i} ({row['names']}): {e}") from None
        return cls(rows, version, settings.cny_per_usd)

    def lookup(self, model: str) -> ResolvedPrice | None:
        m = model.lower()
        if "/" in m and m not in self._exact:
            m = m.rsplit("/", 1)[1]  # "deepseek-ai/deepseek-chat", "openai/gpt-4o"
        hit = self._exact.get(m)
        if hit is not None:
            return hit
        for prefix, resolved in self._prefix:
            if m.startswith(prefix):
                return resolved
        return None


def _row_price(row: dict[str, Any]) -> Price:
    return Price.model_validate({k: v for k, v in row.items() if k not in _ROW_META})


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: price file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with 'models'")
    return data


_VENDOR_HOSTS = (
    ("deepseek", "deepseek"),
    ("dashscope", "alibaba"),
    ("aliyun", "alibaba"),
    ("bigmodel", "zhipu"),
    ("z.ai", "zhipu"),
    ("moonshot", "moonshot"),
    ("openai.com", "openai"),
    ("anthropic", "anthropic"),
    ("googleapis", "google"),
)


def vendor_of(dep: DeploymentBase, price: ResolvedPrice | None) -> str:
    """Who bills a deployment: config ``vendor``, else the catalog row, else the host, else the provider."""
    if dep.vendor:
        return dep.vendor
    provider = getattr(dep, "provider", "unknown")
    if provider == "local":
        return "self-hosted"
    url = str(getattr(dep, "public_url", "") or "")
    for needle, vendor in _VENDOR_HOSTS:
        if needle in url:
            return vendor
    if "self_hosted" in dep.tags:
        return "self-hosted"
    if price is not None and price.vendor:
        return price.vendor
    host = re.sub(r"^https?://", "", url).split("/")[0].split(":")[0]
    return host or str(provider)


EMBEDDED_PRICE = Price(input=0.0, output=0.0)  # in-process llama.cpp: no vendor bills it


def deployment_price(dep: DeploymentBase, catalog: PriceCatalog) -> ResolvedPrice | None:
    """Config ``price`` first; the embedded (``provider: local``) engine costs 0; else the catalog."""
    if dep.price is not None:
        return resolve(Price.model_validate(dep.price), catalog.cny_per_usd, dep.vendor, "config")
    if getattr(dep, "provider", None) == "local":
        return resolve(EMBEDDED_PRICE, catalog.cny_per_usd, "self-hosted", "embedded model, run in-process: priced at 0")
    return catalog.lookup(dep.model)
