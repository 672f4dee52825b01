"""API key secrets: how they are spelled, made and checked.

A secret is ``sak_<id>_<random>``: ``id`` is 12 hex digits, public (``keys list`` shows it, the
store looks a secret up by it), ``random`` is 32 bytes from ``secrets.token_urlsafe``. Only the
SHA-256 of the whole secret is stored. A slow password hash buys nothing here: 256 random bits
cannot be guessed offline, and the hot path hashes once per request. Hashes are compared with
``hmac.compare_digest``, so the comparison's time says nothing about how much of a hash matched.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

PREFIX = "sak_"
_SECRET = re.compile(r"^sak_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


def new_secret() -> tuple[str, str]:
    """A fresh ``(key_id, secret)``."""
    key_id = secrets.token_hex(6)
    return key_id, f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(presented: str) -> str | None:
    """The public id of a well-formed secret, else None (a static key, or garbage)."""
    match = _SECRET.match(presented)
    return match.group(1) if match else None


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def matches(presented_digest: str, stored_digest: str) -> bool:
    return hmac.compare_digest(presented_digest.encode(), stored_digest.encode())


def public_id(key_id: str) -> str:
    """What ``keys list`` and logs show of a secret: its prefix and id, never the rest."""
    return f"{PREFIX}{key_id}"
