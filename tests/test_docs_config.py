"""Every config block in README.md and docs/*.md works as copied.

A newcomer copies a ```yaml block and the ``export`` lines next to it; the block must then load.
The environment here holds only the variables that the ``export`` lines around the block (between
the neighbouring yaml blocks, within the block's section) set, each to a placeholder, so a ``${VAR}`` the document forgets to export fails this test, as it would fail
the reader. A block that is a piece of a config (``deployments:`` of one model, ``trials:``)
is checked inside the smallest config that holds it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kaiyuan.config import GatewayConfig, parse_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"```yaml\n(.*?)```", re.S)
_EXPORT = re.compile(r"^\s*export\s+(.+)$", re.M)


def _blocks() -> list[tuple[str, int, str, dict[str, str]]]:
    """(document, index, yaml text, the env its neighbourhood exports) for every ```yaml block."""
    out = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        found = list(_BLOCK.finditer(text))
        for i, m in enumerate(found):
            start = max(found[i - 1].end() if i else 0, text.rfind("\n## ", 0, m.start()))
            nxt = text.find("\n## ", m.end())
            end = min(found[i + 1].start() if i + 1 < len(found) else len(text), nxt if nxt >= 0 else len(text))
            out.append((doc.name, i, m.group(1), _exported(text[start:m.start()] + text[m.end():end])))
    return out


def _exported(text: str) -> dict[str, str]:
    """The variables that ``export`` lines between the neighbouring yaml blocks set."""
    env: dict[str, str] = {}
    for line in _EXPORT.findall(text):
        for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", line):
            env[name] = f"placeholder-{name.lower()}"
    return env


_FILLER_MODEL = {"name": "m", "deployments": [{"provider": "openai_compatible", "base_url": "http://h/v1", "model": "m"}]}


def _as_config(data: dict) -> dict:
    """A fragment inside the smallest whole config."""
    if set(data) == {"deployments"}:
        return {"models": [{"name": "m", **data}]}
    if "trials" in data and "models" not in data:
        names = {t.get(k) for t in data["trials"] for k in ("incumbent", "candidate")} - {None}
        names |= {c for t in data["trials"] for c in t.get("candidates", [])}
        return {**data, "models": [{**_FILLER_MODEL, "name": n} for n in sorted(names)]}
    return data


@pytest.mark.parametrize(("doc", "index", "block", "env"), _blocks(), ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None)
def test_config_block_loads_as_copied(doc: str, index: int, block: str, env: dict[str, str]) -> None:
    data = yaml.safe_load(block)  # the block must be valid YAML
    assert isinstance(data, dict), f"{doc} yaml block {index} is not a mapping"
    unknown = set(data) - set(GatewayConfig.model_fields) - {"deployments"}
    if unknown and not set(data) & set(GatewayConfig.model_fields):
        pytest.skip(f"{doc} block {index} is not a gateway config ({sorted(data)})")
    parse_config(_as_config(data), f"{doc} yaml block {index}", env)


def test_the_blocks_were_found() -> None:
    assert any(doc == "README.md" for doc, *_ in _blocks())
