"""The durable usage ledger on the head node (SQLite, WAL, synchronous=FULL).

Usage is **instance-seconds**: an instance is one running LLM replica (with its GPU count). Time
accrues at heartbeats: each heartbeat extends the instance's open interval to ``now``, so the
time a dead replica spends dead is never billed, and a gap while the license actor itself was
down is billed at the next heartbeat (the replica was running all along).

Reports are exactly-once: ``seal_report`` moves every open interval into a new report id in one
transaction; delivery is retried with the same id (the server ignores replays) until
``mark_delivered``. A crash at any point leaves either unsealed intervals or an undelivered
report, never a lost or duplicated second.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    instance_id TEXT PRIMARY KEY, model TEXT NOT NULL, gpus REAL NOT NULL,
    registered_at REAL NOT NULL, last_seen REAL NOT NULL, stopped INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS intervals (
    id INTEGER PRIMARY KEY AUTOINCREMENT, instance_id TEXT NOT NULL, start REAL NOT NULL,
    "end" REAL NOT NULL, gpus REAL NOT NULL, report_id TEXT);
CREATE INDEX IF NOT EXISTS intervals_open ON intervals (instance_id, report_id);
CREATE TABLE IF NOT EXISTS reports (
    report_id TEXT PRIMARY KEY, created_at REAL NOT NULL, delivered_at REAL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


# instances.stopped: 0 live, 1 silent too long (a later heartbeat revives it), 2 said goodbye.
EXPIRED, DEREGISTERED = 1, 2


@dataclass(frozen=True)
class Report:
    report_id: str
    intervals: list[dict[str, Any]]

    @property
    def seconds(self) -> float:
        return sum(i["end"] - i["start"] for i in self.intervals)


class UsageLedger:
    def __init__(self, path: str | Path, now: Callable[[], float] = time.time) -> None:
        self._path = Path(path)
        self._now = now
        self._db: sqlite3.Connection | None = None

    def start(self) -> UsageLedger:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, isolation_level=None, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a second acknowledged is a second on disk
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

    # -- meta -----------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._tx().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._tx().execute("INSERT INTO meta(key, value) VALUES (?, ?) "
                           "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def cluster_id(self) -> str:
        """A random id for this cluster, made once and kept: the only identity reported."""
        value = self.get_meta("cluster_id")
        if value is None:
            value = f"cl_{uuid.uuid4().hex[:20]}"
            self.set_meta("cluster_id", value)
        return value

    # -- accrual ----------------------------------------------------------------------------------

    def register(self, instance_id: str, model: str, gpus: float) -> None:
        now = self._now()
        db = self._tx()
        with db:
            row = db.execute("SELECT stopped FROM instances WHERE instance_id = ?",
                             (instance_id,)).fetchone()
            if row is None:
                db.execute("INSERT INTO instances VALUES (?, ?, ?, ?, ?, 0)",
                           (instance_id, model, gpus, now, now))
                return
        self.heartbeat(instance_id)

    def heartbeat(self, instance_id: str) -> bool:
        """Accrue up to now. False for an unknown instance (the caller re-registers it)."""
        now = self._now()
        db = self._tx()
        with db:
            row = db.execute("SELECT last_seen, gpus, stopped FROM instances "
                             "WHERE instance_id = ?", (instance_id,)).fetchone()
            if row is None:
                return False
            last_seen, gpus, stopped = row
            if stopped == DEREGISTERED:  # a heartbeat that raced the replica's goodbye
                return True
            # A heartbeat after an expiry revives the instance: it was running, its actor or
            # network was not.
            db.execute("UPDATE instances SET last_seen = ?, stopped = 0 WHERE instance_id = ?",
                       (max(now, last_seen), instance_id))
            if now <= last_seen:
                return True
            updated = db.execute(
                'UPDATE intervals SET "end" = ? WHERE instance_id = ? AND report_id IS NULL '
                'AND "end" = ?', (now, instance_id, last_seen)).rowcount
            if not updated:
                db.execute('INSERT INTO intervals(instance_id, start, "end", gpus) '
                           "VALUES (?, ?, ?, ?)", (instance_id, last_seen, now, gpus))
        return True

    def deregister(self, instance_id: str) -> None:
        self.heartbeat(instance_id)
        with self._tx() as db:
            db.execute("UPDATE instances SET stopped = ? WHERE instance_id = ?",
                       (DEREGISTERED, instance_id))

    def expire(self, timeout_s: float) -> list[str]:
        """Stop counting instances silent for ``timeout_s``; their usage ended at last_seen."""
        cutoff = self._now() - timeout_s
        with self._tx() as db:
            ids = [r[0] for r in db.execute(
                "SELECT instance_id FROM instances WHERE stopped = 0 AND last_seen <= ?",
                (cutoff,))]
            db.executemany("UPDATE instances SET stopped = ? WHERE instance_id = ?",
                           [(EXPIRED, i) for i in ids])
        return ids

    def live(self) -> list[dict[str, Any]]:
        rows = self._tx().execute(
            "SELECT instance_id, model, gpus, registered_at, last_seen FROM instances "
            "WHERE stopped = 0 ORDER BY registered_at").fetchall()
        return [dict(zip(("instance_id", "model", "gpus", "registered_at", "last_seen"), r,
                         strict=True)) for r in rows]

    # -- reporting ----------------------------------------------------------------------------------

    def seal_report(self) -> Report | None:
        """Move all open intervals into a new report; None when there is nothing to report."""
        db = self._tx()
        with db:
            count = db.execute('SELECT COUNT(*) FROM intervals WHERE report_id IS NULL '
                               'AND "end" > start').fetchone()[0]
            if not count:
                return None
            report_id = f"rep_{uuid.uuid4().hex}"
            db.execute("INSERT INTO reports VALUES (?, ?, NULL)", (report_id, self._now()))
            db.execute('UPDATE intervals SET report_id = ? WHERE report_id IS NULL '
                       'AND "end" > start', (report_id,))
        return self._report(report_id)

    def _report(self, report_id: str) -> Report:
        rows = self._tx().execute(
            'SELECT instance_id, start, "end", gpus FROM intervals WHERE report_id = ? '
            "ORDER BY id", (report_id,)).fetchall()
        return Report(report_id, [dict(zip(("instance_id", "start", "end", "gpus"), r,
                                           strict=True)) for r in rows])

    def pending_reports(self) -> list[Report]:
        ids = [r[0] for r in self._tx().execute(
            "SELECT report_id FROM reports WHERE delivered_at IS NULL ORDER BY created_at")]
        return [self._report(i) for i in ids]

    def mark_delivered(self, report_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE reports SET delivered_at = ? WHERE report_id = ?",
                       (self._now(), report_id))

    def totals(self) -> dict[str, float]:
        """Seconds accrued in all, still to deliver, and when the last report was delivered."""
        db = self._tx()
        total = db.execute('SELECT COALESCE(SUM("end" - start), 0) FROM intervals').fetchone()[0]
        pending = db.execute(
            'SELECT COALESCE(SUM(i."end" - i.start), 0) FROM intervals i LEFT JOIN reports r '
            "ON i.report_id = r.report_id WHERE r.delivered_at IS NULL").fetchone()[0]
        last = db.execute("SELECT MAX(delivered_at) FROM reports").fetchone()[0]
        return {"instance_seconds": float(total), "pending_seconds": float(pending),
                "last_report_at": last}
