"""The key store: named API keys (hashed), their limits, and usage per key, model and UTC day.

One SQLite file on the head node, beside the usage ledger. Two kinds of writer share it, which
SQLite's locking (WAL, a busy timeout) makes safe: the operator's ``python -m serve_app keys``
commands change keys, and the key actor adds the usage replicas report. Every change to keys
bumps ``version`` in the same transaction; the actor hands replicas a new table only when it
moved. Nothing here ever leaves the customer's machines: the license server sees no key names and
no per-key usage.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from serve_app.tenants.secrets import digest, new_secret, public_id

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
    name TEXT PRIMARY KEY, models TEXT NOT NULL, rpm INTEGER, tpm INTEGER,
    max_concurrent INTEGER, created_at REAL NOT NULL, expires_at REAL, revoked_at REAL);
CREATE TABLE IF NOT EXISTS secrets (
    key_id TEXT PRIMARY KEY, name TEXT NOT NULL REFERENCES api_keys(name), hash TEXT NOT NULL,
    created_at REAL NOT NULL, retires_at REAL);
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL, name TEXT NOT NULL, model TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0, prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (day, name, model));
CREATE TABLE IF NOT EXISTS usage_reports (replica_id TEXT PRIMARY KEY, seq INTEGER NOT NULL);
"""

# Labels of requests that carry no named key, in usage and /metrics: a key from the static
# ``api_keys`` list, and a request served without a key (loopback with no keys, or
# ``allow_unauthenticated``). Neither can be a key's name.
STATIC = "static"
ANONYMOUS = "anonymous"
RESERVED = {STATIC, ANONYMOUS}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LIMITS = ("rpm", "tpm", "max_concurrent")


class KeyStoreError(ValueError):
    """An operator's request the store refuses (a name taken, a key unknown or revoked)."""


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise KeyStoreError(f"key name {name!r}: 1 to 64 letters, digits, '.', '_' or '-', "
                            "starting with a letter or digit")
    if name in RESERVED:
        raise KeyStoreError(f"key name {name!r} is reserved (it labels usage without a named "
                            "key)")
    return name


def _positive(field: str, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise KeyStoreError(f"{field} must be at least 1 (leave it out for no limit)")
    return value


class KeyStore:
    """``now`` is the wall clock (injected by tests): expiry and rotation grace are times."""

    def __init__(self, path: str | Path, now: Callable[[], float] = time.time) -> None:
        self.path = Path(path).expanduser()
        self._now = now
        self._db: sqlite3.Connection | None = None

    def start(self) -> KeyStore:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(SCHEMA)
        self._db = db
        return self

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _tx(self) -> sqlite3.Connection:
        assert self._db is not None, "call start() first"
        return self._db

    @contextlib.contextmanager
    def _transaction(self, mode: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
        """One transaction. The connection runs in autocommit mode (``isolation_level=None``),
        where sqlite3's own ``with connection:`` begins nothing: each statement would commit on
        its own. IMMEDIATE takes the write lock at once, so that a read and the write it decides
        cannot interleave with another writer's; DEFERRED (for reads) is one snapshot."""
        db = self._tx()
        db.execute(f"BEGIN {mode}")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def version(self) -> int:
        row = self._tx().execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def _bump(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO meta(key, value) VALUES ('version', '1') ON CONFLICT(key) "
                   "DO UPDATE SET value = CAST(value AS INTEGER) + 1")

    # -- the operator's commands -----------------------------------------------------------------

    def create(self, name: str, *, models: Iterable[str] = (), rpm: int | None = None,
               tpm: int | None = None, max_concurrent: int | None = None,
               expires_at: float | None = None) -> str:
        """A new key; returns its secret, which is stored only as a hash."""
        check_name(name)
        limits = [_positive(f, v) for f, v in zip(LIMITS, (rpm, tpm, max_concurrent),
                                                  strict=True)]
        now = self._now()
        key_id, secret = new_secret()
        with self._transaction() as db:
            row = db.execute("SELECT revoked_at FROM api_keys WHERE name = ?", (name,)).fetchone()
            if row is not None:
                state = "revoked" if row[0] is not None else "active"
                raise KeyStoreError(f"a key named {name!r} exists ({state}); names are never "
                                    "reused, so that usage stays attributable: choose another")
            db.execute("INSERT INTO api_keys(name, models, rpm, tpm, max_concurrent, created_at, "
                       "expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (name, json.dumps(sorted(set(models))), *limits, now, expires_at))
            db.execute("INSERT INTO secrets(key_id, name, hash, created_at) VALUES (?, ?, ?, ?)",
                       (key_id, name, digest(secret), now))
            self._bump(db)
        return secret

    def _live(self, db: sqlite3.Connection, name: str) -> None:
        row = db.execute("SELECT revoked_at FROM api_keys WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise KeyStoreError(f"no key named {name!r}")
        if row[0] is not None:
            raise KeyStoreError(f"the key {name!r} is revoked")

    def revoke(self, name: str) -> None:
        """Every secret of the key stops working (replicas learn it within seconds)."""
        with self._transaction() as db:
            self._live(db, name)
            db.execute("UPDATE api_keys SET revoked_at = ? WHERE name = ?", (self._now(), name))
            self._bump(db)

    def rotate(self, name: str, grace_s: float) -> str:
        """A new secret for the key (same name, limits and usage); the secrets it had keep
        working for ``grace_s`` seconds more, then stop."""
        if grace_s < 0:
            raise KeyStoreError("the grace period cannot be negative")
        now = self._now()
        key_id, secret = new_secret()
        with self._transaction() as db:
            self._live(db, name)
            db.execute("UPDATE secrets SET retires_at = ? WHERE name = ? AND "
                       "(retires_at IS NULL OR retires_at > ?)", (now + grace_s, name, now + grace_s))
            db.execute("INSERT INTO secrets(key_id, name, hash, created_at) VALUES (?, ?, ?, ?)",
                       (key_id, name, digest(secret), now))
            self._bump(db)
        return secret

    def update(self, name: str, **changes: Any) -> None:
        """Change a key's limits, models or expiry (``None`` clears a limit)."""
        allowed = {*LIMITS, "models", "expires_at"}
        unknown = set(changes) - allowed
        if unknown:
            raise KeyStoreError(f"cannot change {', '.join(sorted(unknown))}")
        with self._transaction() as db:
            self._live(db, name)
            for field, value in changes.items():
                if field == "models":
                    value = json.dumps(sorted(set(value)))
                elif field in LIMITS:
                    value = _positive(field, value)
                db.execute(f"UPDATE api_keys SET {field} = ? WHERE name = ?", (value, name))
            self._bump(db)

    def keys(self) -> list[dict[str, Any]]:
        """Every key with its public ids (never a secret or a hash), oldest first."""
        db = self._tx()
        now = self._now()
        out = []
        for name, models, rpm, tpm, conc, created, expires, revoked in db.execute(
                "SELECT name, models, rpm, tpm, max_concurrent, created_at, expires_at, "
                "revoked_at FROM api_keys ORDER BY created_at, name"):
            ids = [public_id(r[0]) for r in db.execute(
                "SELECT key_id FROM secrets WHERE name = ? AND (retires_at IS NULL OR "
                "retires_at > ?) ORDER BY created_at", (name, now))]
            state = ("revoked" if revoked is not None else
                     "expired" if expires is not None and expires <= now else "active")
            out.append({"name": name, "state": state, "ids": ids, "models": json.loads(models),
                        "rpm": rpm, "tpm": tpm, "max_concurrent": conc, "created_at": created,
                        "expires_at": expires, "revoked_at": revoked})
        return out

    def active_keys(self) -> int:
        now = self._now()
        return self._tx().execute(
            "SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL AND "
            "(expires_at IS NULL OR expires_at > ?)", (now,)).fetchone()[0]

    # -- what replicas hold ----------------------------------------------------------------------

    def table(self) -> dict[str, Any]:
        """The whole key table as replicas hold it in memory: keys by name (revoked ones too, so
        that their holders are told), and secrets' hashes by id. Retired secrets are left out."""
        now = self._now()
        with self._transaction("DEFERRED") as db:  # one snapshot: version and rows agree
            version = self.version()
            keys = {name: {"models": json.loads(models), "rpm": rpm, "tpm": tpm,
                           "max_concurrent": conc, "expires_at": expires,
                           "revoked": revoked is not None}
                    for name, models, rpm, tpm, conc, expires, revoked in db.execute(
                        "SELECT name, models, rpm, tpm, max_concurrent, expires_at, revoked_at "
                        "FROM api_keys")}
            secrets = {key_id: {"name": name, "hash": hash_, "retires_at": retires}
                       for key_id, name, hash_, retires in db.execute(
                           "SELECT key_id, name, hash, retires_at FROM secrets WHERE "
                           "retires_at IS NULL OR retires_at > ?", (now,))}
        return {"version": version, "keys": keys, "secrets": secrets}

    # -- usage -------------------------------------------------------------------------------------

    def record_usage(self, replica_id: str, seq: int,
                     rows: Iterable[tuple[str, str, str, int, int, int]]) -> bool:
        """Add a replica's usage report ``(day, name, model, requests, prompt_tokens,
        completion_tokens)`` once: a report whose ``seq`` was applied already (its answer was
        lost, the replica sent it again) changes nothing. Returns whether it was applied."""
        with self._transaction() as db:
            row = db.execute("SELECT seq FROM usage_reports WHERE replica_id = ?",
                             (replica_id,)).fetchone()
            if row is not None and seq <= row[0]:
                return False
            db.executemany(
                "INSERT INTO usage(day, name, model, requests, prompt_tokens, completion_tokens) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(day, name, model) DO UPDATE SET "
                "requests = requests + excluded.requests, "
                "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                "completion_tokens = completion_tokens + excluded.completion_tokens", list(rows))
            db.execute("INSERT INTO usage_reports(replica_id, seq) VALUES (?, ?) "
                       "ON CONFLICT(replica_id) DO UPDATE SET seq = excluded.seq",
                       (replica_id, seq))
        return True

    def usage(self, first_day: str | None = None, last_day: str | None = None
              ) -> list[dict[str, Any]]:
        """Usage per UTC day, key and model, between two days (``YYYY-MM-DD``, inclusive)."""
        rows = self._tx().execute(
            "SELECT day, name, model, requests, prompt_tokens, completion_tokens FROM usage "
            "WHERE day >= ? AND day <= ? ORDER BY day, name, model",
            (first_day or "0000-00-00", last_day or "9999-99-99")).fetchall()
        return [dict(zip(("day", "key", "model", "requests", "prompt_tokens",
                          "completion_tokens"), r, strict=True)) for r in rows]
