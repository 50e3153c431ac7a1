"""The ``price`` of a deployment and of a catalog row: per million tokens, checked with pydantic.

Kept apart from :mod:`kaiyuan.config` (which validates a deployment's ``price`` with
:func:`validate_price`) so that the price catalog (:mod:`kaiyuan.accounting.prices`) and the
configuration share one set of rules.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class PriceTier(_Strict):
    """A price that applies when the prompt has more than ``above_tokens`` tokens."""

    above_tokens: int = Field(..., ge=0)
    input: float = Field(..., ge=0)
    output: float = Field(..., ge=0)
    cache_hit: float | None = Field(None, ge=0)
    cache_write: float | None = Field(None, ge=0)


class Price(_Strict):
    """Prices per million tokens. ``currency`` CNY is converted with ``accounting.cny_per_usd``.

    ``cached_input`` is accepted as another name for ``cache_hit``. Deployments keep their price
    as the plain dict this model validates (``price["input"]``), see :func:`validate_price`.
    """

    input: float = Field(..., ge=0, description="per million prompt tokens (cache miss)")
    output: float = Field(..., ge=0, description="per million completion tokens")
    cache_hit: float | None = Field(None, ge=0, description="per million cached prompt tokens (default: input)")
    cache_write: float | None = Field(None, ge=0, description="per million cache-write tokens (default: input)")
    currency: Literal["USD", "CNY"] = "USD"
    tiers: list[PriceTier] = Field(default_factory=list, description="higher prices above a prompt length")
    max_output_tokens: int | None = Field(None, gt=0, description="the model's output limit (for reservations)")

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, v: Any) -> Any:
        if isinstance(v, dict) and "cached_input" in v:
            v = dict(v)
            hit = v.pop("cached_input")
            v.setdefault("cache_hit", hit)
        if isinstance(v, dict) and isinstance(v.get("currency"), str):
            v = {**v, "currency": v["currency"].upper()}
        return v

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


PRICE_KEYS = frozenset({"input", "output", "cached_input", "cache_hit", "cache_write", "currency", "tiers", "max_output_tokens"})


def validate_price(v: dict[str, Any] | None) -> dict[str, Any] | None:
    """``price: {input: 0.27, output: 1.10, cached_input: 0.07, currency: USD}`` (per million tokens;
    also ``cache_hit`` (= cached_input), ``cache_write``, ``tiers``, ``max_output_tokens``).

    Checked with :class:`Price`, returned as a plain dict of the keys given (numbers as floats,
    ``currency`` upper-cased and filled in) so that any module can read ``price["input"]``.
    """
    if v is None:
        return None
    if not isinstance(v, dict):
        raise ValueError("price must be a mapping such as {input: 0.27, output: 1.10}")
    unknown = sorted(set(v) - PRICE_KEYS)
    if unknown:
        raise ValueError(f"unknown price keys {unknown}; use input, output, cached_input, cache_write (per 1M tokens), currency, tiers")
    for k in ("input", "output"):
        if k not in v:
            raise ValueError(f"price needs '{k}' (price per million {k} tokens)")
    out: dict[str, Any] = {"currency": "USD"}
    for k, x in v.items():
        if k == "currency":
            if not isinstance(x, str) or x.upper() not in ("USD", "CNY"):
                raise ValueError(f"price.currency must be USD or CNY (CNY is converted with accounting.cny_per_usd), got {x!r}")
            out[k] = x.upper()
        elif k == "tiers":
            out[k] = x
        elif k == "max_output_tokens":
            if isinstance(x, bool) or not isinstance(x, int) or x <= 0:
                raise ValueError(f"price.max_output_tokens must be a whole number > 0, got {x!r}")
            out[k] = x
        else:
            if isinstance(x, bool) or not isinstance(x, int | float) or x < 0:
                raise ValueError(f"price.{k} must be a number >= 0 (per million tokens), got {x!r}")
            out[k] = float(x)
    try:
        Price.model_validate(out)  # tiers and the rest, with the same rules as the catalog
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise ValueError(f"price.{where}: {err['msg']}" if where else err["msg"]) from None
    return out
