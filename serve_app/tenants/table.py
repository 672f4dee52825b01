"""What a replica holds of the key store: every key and secret hash, in memory.

The request path looks a presented secret up here and nowhere else: a dict lookup by its public
id, one SHA-256, one constant-time comparison. The table is replaced whole when the key actor
has a newer version (``KeySync``); static ``api_keys`` from the configuration are unnamed keys
that live only here, labelled ``static``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from serve_app.tenants.secrets import digest, key_id_of, matches
from serve_app.tenants.store import ANONYMOUS, STATIC


class InvalidKeyError(ValueError):
    """The request's key is missing, unknown, revoked, retired or expired (a 401)."""


@dataclass(frozen=True)
class KeyPolicy:
    """A named key's scope and limits (None: no limit)."""

    name: str
    models: frozenset[str] = frozenset()  # empty: every model
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    expires_at: float | None = None
    revoked: bool = False

    def allows(self, names: Iterable[str]) -> bool:
        """Whether the key covers a model known by any of ``names``."""
        return not self.models or not self.models.isdisjoint(names)

    @property
    def limited(self) -> bool:
        return any(v is not None for v in (self.rpm, self.tpm, self.max_concurrent))

    @classmethod
    def from_row(cls, name: str, row: Mapping[str, Any]) -> KeyPolicy:
        return cls(name, frozenset(row.get("models") or ()), row.get("rpm"), row.get("tpm"),
                   row.get("max_concurrent"), row.get("expires_at"), bool(row.get("revoked")))


# Requests with a static key, or without a key where none is required: no scope, no limits.
UNNAMED = {STATIC: KeyPolicy(STATIC), ANONYMOUS: KeyPolicy(ANONYMOUS)}

MISSING = "Missing API key: send 'Authorization: Bearer <key>'."
INVALID = "Invalid API key: send 'Authorization: Bearer <key>' with a key of this server."


class KeyTable:
    def __init__(self, static_keys: Iterable[str] = (),
                 now: Callable[[], float] = time.time) -> None:
        self._static = [digest(k) for k in static_keys]
        self._now = now
        self.version: int | None = None  # None: not loaded from the key actor yet
        self._keys: dict[str, KeyPolicy] = {}
        self._secrets: dict[str, tuple[str, str, float | None]] = {}

    def load(self, table: Mapping[str, Any]) -> None:
        """Replace the named keys with the key store's ``table()``."""
        self._keys = {name: KeyPolicy.from_row(name, row) for name, row in table["keys"].items()}
        self._secrets = {key_id: (s["name"], s["hash"], s.get("retires_at"))
                         for key_id, s in table["secrets"].items()}
        self.version = int(table["version"])

    def any_keys(self) -> bool:
        """Whether any key exists, static or named (revoked ones too): then keys are required,
        even where a server without any key would be open (loopback)."""
        return bool(self._static or self._keys)

    def active_keys(self) -> int:
        now = self._now()
        named = sum(1 for p in self._keys.values()
                    if not p.revoked and (p.expires_at is None or p.expires_at > now))
        return named + len(self._static)

    def policy(self, name: str) -> KeyPolicy:
        return self._keys.get(name) or UNNAMED[name]

    def names(self) -> list[str]:
        return sorted(self._keys)

    def authenticate(self, authorization: str | None) -> KeyPolicy:
        """The policy of the key in an ``Authorization`` header value; raises
        ``InvalidKeyError`` with the message the client gets."""
        scheme, _, token = (authorization or "").partition(" ")
        presented = token.strip()
        if scheme.lower() != "bearer" or not presented:
            raise InvalidKeyError(MISSING)
        hashed = digest(presented)
        key_id = key_id_of(presented)
        if key_id is None:
            # Compared with every static key, always: timing says nothing about which one
            # nearly matched.
            matched = False
            for stored in self._static:
                matched |= matches(hashed, stored)
            if matched:
                return UNNAMED[STATIC]
            raise InvalidKeyError(INVALID)
        found = self._secrets.get(key_id)
        if found is None or not matches(hashed, found[1]):
            raise InvalidKeyError(INVALID)
        name, _, retires_at = found
        policy = self._keys.get(name)
        now = self._now()
        # Told only to whoever holds the secret: the hash matched.
        if policy is None or policy.revoked:
            raise InvalidKeyError(f"The API key {name!r} was revoked.")
        if policy.expires_at is not None and policy.expires_at <= now:
            raise InvalidKeyError(f"The API key {name!r} expired.")
        if retires_at is not None and retires_at <= now:
            raise InvalidKeyError(f"This secret of the API key {name!r} was rotated and its "
                                  "grace period is over: use the new secret.")
        return policy
