"""Sealed reasoning: ``reasoning.encrypted_content`` for the Responses API with ``store: false``.

A stateless client (Codex) keeps nothing on the gateway, yet its next turn must hand the model its
reasoning back, with any upstream signature (Anthropic refuses unsigned thinking). The gateway
returns the reasoning sealed with AES-256-GCM (``cryptography``): confidential and integrity
protected, so a client can neither read nor alter it; an altered or foreign blob is a clear 400.

The key is derived (HKDF-SHA256) from ``responses.seal_secret`` when configured, else from the
master key, else from a random secret the gateway generates once and keeps in its store
(``gateway_secrets``), so replicas sharing a database share the key and blobs survive restarts.
"""

from __future__ import annotations

import base64
import os
import time

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import IntegrityError

from kaiyuan.dialects import canonical as c
from kaiyuan.errors import invalid
from kaiyuan.store.schema import gateway_secrets

PREFIX = "ky1."
AAD = b"kaiyuan reasoning v1"
SECRET_NAME = "reasoning_seal"
MAX_BLOB = 4 * 1024 * 1024  # characters; a larger blob is not one this gateway made


def derive_key(secret: str) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"kaiyuan responses reasoning seal v1")
    return hkdf.derive(secret.encode())


def stored_secret(engine: Engine | None) -> str:
    """The generated secret kept in the store (made on first use; the first replica's wins)."""
    if engine is None:
        return os.urandom(32).hex()  # no store: blobs last as long as this process
    with engine.begin() as conn:
        row = conn.execute(select(gateway_secrets.c.value).where(gateway_secrets.c.name == SECRET_NAME)).first()
        if row is not None:
            return str(row[0])
    try:
        with engine.begin() as conn:
            conn.execute(insert(gateway_secrets).values(name=SECRET_NAME, value=os.urandom(32).hex(), created_at=time.time()))
    except IntegrityError:  # another replica made it first
        pass
    with engine.begin() as conn:
        return str(conn.execute(select(gateway_secrets.c.value).where(gateway_secrets.c.name == SECRET_NAME)).scalar_one())


class Sealer:
    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, b: c.Thinking) -> str:
        plain = orjson.dumps({"t": b.text, "s": b.signature, "r": b.redacted})
        nonce = os.urandom(12)
        return PREFIX + base64.urlsafe_b64encode(nonce + self._aead.encrypt(nonce, plain, AAD)).decode().rstrip("=")

    def open(self, blob: str) -> c.Thinking | None:
        """The reasoning in a blob this gateway sealed; None for a blob that is not one of ours (another
        provider's, e.g. OpenAI's own, from before a client moved here: no upstream here could use it);
        a 400 for one of ours that was altered or sealed with another key."""
        if not blob.startswith(PREFIX):
            return None
        bad = invalid("reasoning.encrypted_content cannot be opened: it was altered, or sealed by another gateway "
                      "or with another key; send the reasoning item back exactly as it was returned, or leave it out",
                      param="input", code="invalid_encrypted_content")
        if len(blob) > MAX_BLOB:
            raise bad
        try:
            raw = base64.urlsafe_b64decode(blob[len(PREFIX):] + "=" * (-len(blob) % 4))
            obj = orjson.loads(self._aead.decrypt(raw[:12], raw[12:], AAD))
        except (ValueError, InvalidTag, orjson.JSONDecodeError):
            raise bad from None
        return c.Thinking(str(obj.get("t") or ""), signature=obj.get("s"), redacted=obj.get("r"))
