"""Data policies: which deployments a request may reach, decided by the deployments' tags.

A policy is a comma-separated list of terms that must all hold. A term is a tag the deployment
must carry (``self_hosted``), a tag it must not carry (``!vendor:openai``), or alternatives
separated by ``|`` of which one must hold (``region:eu|region:ch``). Examples::

    self_hosted                     only the organisation's own deployments
    !vendor:openai,!vendor:google   anywhere but these vendors
    region:eu|self_hosted           in the EU, or self-hosted

Policies from the model config, the key/team and the ``x-kaiyuan-policy`` header are combined
with AND: a header can narrow what a key may reach, never widen it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

POLICY_HEADER = "x-kaiyuan-policy"
_TAG = re.compile(r"^[A-Za-z0-9_.:\-/*]+$")

Literal_ = tuple[bool, str]  # (negated, tag)


@dataclass(frozen=True, slots=True)
class Policy:
    text: str
    terms: tuple[tuple[Literal_, ...], ...]

    def allows(self, tags: Iterable[str]) -> bool:
        tagset = tags if isinstance(tags, frozenset | set) else frozenset(tags)
        for term in self.terms:
            if not any((tag in tagset) != neg for neg, tag in term):
                return False
        return True

    def why_not(self, tags: Iterable[str]) -> str:
        """The first term a deployment with ``tags`` fails, for error messages."""
        tagset = frozenset(tags)
        for term in self.terms:
            if not any((tag in tagset) != neg for neg, tag in term):
                return "|".join(("!" if neg else "") + tag for neg, tag in term)
        return ""


def parse_policy(text: str) -> Policy:
    """Parse a policy; raises ValueError saying what is wrong."""
    terms: list[tuple[Literal_, ...]] = []
    for raw in text.split(","):
        raw = raw.strip()
        if not raw:
            continue
        lits: list[Literal_] = []
        for alt in raw.split("|"):
            alt = alt.strip()
            neg = alt.startswith("!")
            tag = alt[1:].strip() if neg else alt
            if not tag or not _TAG.match(tag):
                raise ValueError(
                    f"invalid policy {text!r}: {alt!r} is not a tag; write tags such as self_hosted, "
                    f"!vendor:openai or region:eu|region:ch, separated by commas"
                )
            lits.append((neg, tag))
        terms.append(tuple(lits))
    if not terms:
        raise ValueError(f"invalid policy {text!r}: it is empty")
    return Policy(text.strip(), tuple(terms))


def combine(parts: Iterable[str | None]) -> str | None:
    """The AND of several policy texts (``None`` and empty ones ignored)."""
    texts = [p.strip() for p in parts if p and p.strip()]
    if not texts:
        return None
    if len(texts) == 1:
        return texts[0]
    seen: list[str] = []
    for t in texts:
        if t not in seen:
            seen.append(t)
    return ",".join(seen)
