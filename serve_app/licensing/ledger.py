"""The durable usage ledger on the head node (SQLite, WAL, synchronous=FULL).

Usage is **instance-seconds**: an instance is one running LLM replica (with its GPU count). Time
accrues at heartbeats: each heartbeat extends the instance's open interval by the time since its
last one, so the time a dead replica spends dead is never billed, and a gap while the license
actor itself was down is billed at the next heartbeat (the replica was running all along).

Every interval carries the license it accrued under (the one in force when its replica
registered or heartbeated), and is reported under that license, with that license's key, which
the ledger keeps: usage that outlives its license (the last seconds before a renewal) is still
billed to it. Keys are bearer credentials, so the ledger's files are 0600 and a folder it creates
0700.

Times are read from ``now``, the license server's time as the actor estimates it (monotonic
underneath, see ``server_clock.py``). An instance's intervals form one chain: each starts where
the one before ended (``chain_end``), so they never overlap, whatever the clock does. When the
estimate of the server's time moves (``rebase``), the unreported part of each chain moves with
it, but never back over seconds already sealed into a report; the length of every interval stays
what the monotonic clock measured.

Reports are exactly-once: ``seal_reports`` moves every open interval into new report ids in one
transaction (at most ``MAX_REPORT_INTERVALS`` intervals each, no interval longer than
``MAX_INTERVAL_S``, the license server's limits); delivery is retried with the same id (the
server ignores replays) until ``mark_delivered``, which also appends the report to the
hash-chained usage log (``usage_log.py``) in the same transaction. A report the server refuses
for good is ``quarantine``d with its reason, so the reports after it still flow; ``requeue``
offers it again. A crash at any point leaves either unsealed intervals or an undelivered report,
never a lost or duplicated second.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from license_contract import MAX_INTERVAL_S, MAX_REPORT_INTERVALS
from serve_app.licensing import usage_log

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    instance_id TEXT PRIMARY KEY, model TEXT NOT NULL, gpus REAL NOT NULL,
    registered_at REAL NOT NULL, last_seen REAL NOT NULL, stopped INTEGER NOT NULL DEFAULT 0,
    chain_end REAL NOT NULL);
CREATE TABLE IF NOT EXISTS intervals (
    id INTEGER PRIMARY KEY AUTOINCREMENT, instance_id TEXT NOT NULL, start REAL NOT NULL,
    "end" REAL NOT NULL, gpus REAL NOT NULL, report_id TEXT, license_id TEXT);
CREATE INDEX IF NOT EXISTS intervals_open ON intervals (instance_id, report_id);
CREATE TABLE IF NOT EXISTS reports (
    report_id TEXT PRIMARY KEY, created_at REAL NOT NULL, delivered_at REAL,
    license_id TEXT, quarantined_at REAL, reason TEXT);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
""" + usage_log.SCHEMA

# instances.stopped: 0 live, 1 silent too long (a later heartbeat revives it), 2 said goodbye.
EXPIRED, DEREGISTERED = 1, 2
KEY_META = "license_key:"  # + license id: the key its reports are delivered with

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Report:
    report_id: str
    intervals: list[dict[str, Any]]
    license_id: str | None = None

    @property
    def seconds(self) -> float:
        return sum(i["end"] - i["start"] for i in self.intervals)


class UsageLedger:
    def __init__(self, path: str | Path, now: Callable[[], float] = time.time) -> None:
        self._path = Path(path)
        self._now = now
        self._db: sqlite3.Connection | None = None

    def start(self) -> UsageLedger:
        folder = self._path.parent
        if not folder.exists():
            # Only a folder of its own: tightening one it was given (/tmp, the working
            # directory) would lock others out. The files themselves are 0600 either way.
            folder.mkdir(parents=True, mode=0o700)
            folder.chmod(0o700)
        # Created 0600 before SQLite opens it; SQLite gives its -wal and -shm files the same mode.
        os.close(os.open(self._path, os.O_CREAT | os.O_WRONLY, 0o600))
        for path in (self._path, *(Path(f"{self._path}{s}") for s in ("-wal", "-shm"))):
            if path.exists() and path.stat().st_mode & 0o077:
                path.chmod(0o600)
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

    def remember_key(self, license_id: str, key: str) -> None:
        """Keep ``key``: the reports of ``license_id`` are delivered with it, whatever key the
        app runs with by then."""
        self.set_meta(KEY_META + license_id, key)

    def key_of(self, license_id: str) -> str | None:
        return self.get_meta(KEY_META + license_id)

    def cluster_id(self) -> str:
        """A random id for this cluster, made once and kept: the only identity reported."""
        value = self.get_meta("cluster_id")
        if value is None:
            value = f"cl_{uuid.uuid4().hex[:20]}"
            self.set_meta("cluster_id", value)
        return value

    # -- accrual ----------------------------------------------------------------------------------

    def register(self, instance_id: str, model: str, gpus: float,
                 license_id: str | None = None) -> None:
        """Start counting ``instance_id`` from now, under ``license_id`` (an instance known
        already just heartbeats)."""
        now = self._now()
        db = self._tx()
        with db:
            row = db.execute("SELECT stopped FROM instances WHERE instance_id = ?",
                             (instance_id,)).fetchone()
            if row is None:
                db.execute("INSERT INTO instances(instance_id, model, gpus, registered_at, "
                           "last_seen, stopped, chain_end) VALUES (?, ?, ?, ?, ?, 0, ?)",
                           (instance_id, model, gpus, now, now, now))
                return
        self.heartbeat(instance_id, license_id)

    def heartbeat(self, instance_id: str, license_id: str | None = None) -> bool:
        """Accrue up to now, under ``license_id`` (the license in force): a license other than
        the open interval's starts a new interval where the chain ends. False for an unknown
        instance (the caller re-registers it)."""
        now = self._now()
        db = self._tx()
        with db:
            row = db.execute("SELECT last_seen, chain_end, gpus, stopped "
                             "FROM instances WHERE instance_id = ?", (instance_id,)).fetchone()
            if row is None:
                return False
            last_seen, chain_end, gpus, stopped = row
            if stopped == DEREGISTERED:  # a heartbeat that raced the replica's goodbye
                return True
            # A heartbeat after an expiry revives the instance: it was running, its actor or
            # network was not.
            elapsed = now - last_seen
            if elapsed <= 0:  # a clock that went back (another boot): measure from here on
                db.execute("UPDATE instances SET last_seen = ?, stopped = 0 "
                           "WHERE instance_id = ?", (now, instance_id))
                return True
            end = chain_end + elapsed
            updated = db.execute(
                'UPDATE intervals SET "end" = ? WHERE instance_id = ? AND report_id IS NULL '
                'AND "end" = ? AND license_id IS ?',
                (end, instance_id, chain_end, license_id)).rowcount
            if not updated:
                db.execute('INSERT INTO intervals(instance_id, start, "end", gpus, license_id) '
                           "VALUES (?, ?, ?, ?, ?)", (instance_id, chain_end, end, gpus,
                                                      license_id))
            db.execute("UPDATE instances SET last_seen = ?, chain_end = ?, stopped = 0 "
                       "WHERE instance_id = ?", (now, end, instance_id))
        return True

    def deregister(self, instance_id: str, license_id: str | None = None) -> None:
        self.heartbeat(instance_id, license_id)
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

    def rebase(self, delta: float, meta: dict[str, str] | None = None) -> None:
        """The clock ``now`` reads just jumped by ``delta`` (a better estimate of the server's
        time). Times kept for measuring (last_seen) move by exactly ``delta``, so no heartbeat
        gains or loses a second. Each instance's unreported intervals move to end where the
        new clock says they end, except that they never move back over the end of its last
        sealed interval: there the chain keeps a lead, which later moves absorb. ``meta`` is
        written in the same transaction (the clock's new offset)."""
        db = self._tx()
        with db:
            # Replicas long gone (said goodbye, nothing left to report) cannot accrue again.
            rows = db.execute("SELECT instance_id, last_seen, chain_end "
                              "FROM instances WHERE stopped != ? OR instance_id IN (SELECT "
                              "instance_id FROM intervals WHERE report_id IS NULL)",
                              (DEREGISTERED,)).fetchall()
            for instance_id, last_seen, chain_end in rows:
                open_start, sealed_end = db.execute(
                    "SELECT MIN(CASE WHEN report_id IS NULL THEN start END), "
                    'MAX(CASE WHEN report_id IS NOT NULL THEN "end" END) '
                    "FROM intervals WHERE instance_id = ?", (instance_id,)).fetchone()
                shift = last_seen + delta - chain_end
                if sealed_end is not None:
                    first = chain_end if open_start is None else open_start
                    shift = max(shift, sealed_end - first)
                db.execute('UPDATE intervals SET start = start + ?, "end" = "end" + ? '
                           "WHERE instance_id = ? AND report_id IS NULL",
                           (shift, shift, instance_id))
                db.execute("UPDATE instances SET last_seen = last_seen + ?, chain_end = ? "
                           "WHERE instance_id = ?", (delta, chain_end + shift, instance_id))
            for key, value in (meta or {}).items():
                db.execute("INSERT INTO meta(key, value) VALUES (?, ?) "
                           "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    # -- reporting ----------------------------------------------------------------------------------

    def seal_reports(self, license_id: str | None = None,
                     max_intervals: int = MAX_REPORT_INTERVALS,
                     max_interval_s: float = MAX_INTERVAL_S) -> list[Report]:
        """Move all open intervals into new reports, one set per license the intervals accrued
        under (``license_id`` for intervals that name none), cutting intervals longer than
        ``max_interval_s``; none when there is nothing to report."""
        db = self._tx()
        now = self._now()
        ids: list[str] = []
        with db:
            long = db.execute('SELECT id, instance_id, start, "end", gpus, license_id '
                              'FROM intervals WHERE report_id IS NULL AND "end" - start > ?',
                              (max_interval_s,)).fetchall()
            for row_id, instance_id, start, end, gpus, lid in long:
                cut = start + max_interval_s
                db.execute('UPDATE intervals SET "end" = ? WHERE id = ?', (cut, row_id))
                while cut < end:
                    nxt = min(end, cut + max_interval_s)
                    db.execute('INSERT INTO intervals(instance_id, start, "end", gpus, '
                               "license_id) VALUES (?, ?, ?, ?, ?)",
                               (instance_id, cut, nxt, gpus, lid))
                    cut = nxt
            by_license: dict[str | None, list[int]] = {}
            for row_id, lid in db.execute(
                    "SELECT id, COALESCE(license_id, ?) FROM intervals WHERE report_id IS NULL "
                    'AND "end" > start ORDER BY id', (license_id,)):
                by_license.setdefault(lid, []).append(row_id)
            for lid, rows in by_license.items():
                for k in range(0, len(rows), max_intervals):
                    chunk = rows[k:k + max_intervals]
                    report_id = f"rep_{uuid.uuid4().hex}"
                    db.execute("INSERT INTO reports(report_id, created_at, license_id) "
                               "VALUES (?, ?, ?)", (report_id, now, lid))
                    db.executemany("UPDATE intervals SET report_id = ? WHERE id = ?",
                                   [(report_id, i) for i in chunk])
                    ids.append(report_id)
        return [self._report(i) for i in ids]

    def _report(self, report_id: str) -> Report:
        db = self._tx()
        rows = db.execute(
            'SELECT instance_id, start, "end", gpus FROM intervals WHERE report_id = ? '
            "ORDER BY id", (report_id,)).fetchall()
        lid = db.execute("SELECT license_id FROM reports WHERE report_id = ?",
                         (report_id,)).fetchone()
        return Report(report_id, [dict(zip(("instance_id", "start", "end", "gpus"), r,
                                           strict=True)) for r in rows],
                      lid[0] if lid else None)

    def pending_reports(self) -> list[Report]:
        """Sealed reports to deliver, oldest first; quarantined ones wait for ``requeue``."""
        ids = [r[0] for r in self._tx().execute(
            "SELECT report_id FROM reports WHERE delivered_at IS NULL AND quarantined_at IS NULL "
            "ORDER BY created_at, rowid")]
        return [self._report(i) for i in ids]

    def mark_delivered(self, report_id: str, license_id: str | None = None) -> None:
        """The server accepted the report (billed to ``license_id``): record it, and append it
        to the usage log, in one transaction."""
        now = self._now()
        db = self._tx()
        with db:
            done = db.execute(
                "UPDATE reports SET delivered_at = ?, license_id = COALESCE(?, license_id), "
                "quarantined_at = NULL WHERE report_id = ? AND delivered_at IS NULL",
                (now, license_id, report_id)).rowcount
            if not done:
                return
            lid = db.execute("SELECT license_id FROM reports WHERE report_id = ?",
                             (report_id,)).fetchone()[0]
            cluster = db.execute("SELECT value FROM meta WHERE key = 'cluster_id'").fetchone()
            usage_log.append(db, {
                "report_id": report_id, "license_id": lid,
                "cluster_id": cluster[0] if cluster else None, "delivered_at": now,
                "intervals": self._report(report_id).intervals})

    def keep_locally(self, report_id: str, cluster_id: str) -> None:
        """Air-gapped: the report cannot be sent, so it is logged as a ``report`` entry (and
        counts as delivered: it leaves the cluster in a bundle)."""
        now = self._now()
        db = self._tx()
        with db:
            done = db.execute("UPDATE reports SET delivered_at = ? WHERE report_id = ? AND "
                              "delivered_at IS NULL", (now, report_id)).rowcount
            if not done:
                return
            lid = db.execute("SELECT license_id FROM reports WHERE report_id = ?",
                             (report_id,)).fetchone()[0]
            usage_log.append(db, {"kind": "report", "at": float(now), "license_id": lid,
                                  "cluster_id": cluster_id, "report_id": report_id,
                                  "intervals": [{**i, "gpus": float(i["gpus"]),
                                                 "start": float(i["start"]),
                                                 "end": float(i["end"])}
                                                for i in self._report(report_id).intervals]})

    def log_event(self, kind: str, license_id: str, cluster_id: str,
                  instances: int | None = None, gpus: float | None = None) -> str:
        """Air-gapped: append a ``beat`` (what runs now), ``start`` or ``stop`` entry; returns
        the log's new head."""
        # Written as the contract spells it (``entry_text``): the vendor refuses other spellings.
        entry: dict[str, Any] = {"kind": kind, "at": float(self._now()), "license_id": license_id,
                                 "cluster_id": cluster_id, "intervals": []}
        if instances is not None:
            entry["instances"] = instances
        if gpus is not None:
            entry["gpus"] = float(gpus)
        db = self._tx()
        with db:
            usage_log.append(db, entry, key=f"{kind}_{uuid.uuid4().hex}")
            return usage_log.head(db)

    def log_head(self) -> str:
        return usage_log.head(self._tx())

    def log_after(self, known: str) -> list[tuple[int, str, str]] | None:
        """The usage log's entries after the one whose hash is ``known``; None if none is."""
        return usage_log.after(self._tx(), known)

    def quarantine(self, report_id: str, reason: str) -> None:
        """The server refused the report for good: keep it, with the reason, out of the way."""
        with self._tx() as db:
            db.execute("UPDATE reports SET quarantined_at = ?, reason = ? WHERE report_id = ? "
                       "AND delivered_at IS NULL", (self._now(), reason, report_id))

    def requeue(self, report_id: str) -> bool:
        """Offer a quarantined report for delivery again (same id, same content)."""
        with self._tx() as db:
            return db.execute("UPDATE reports SET quarantined_at = NULL WHERE report_id = ? "
                              "AND delivered_at IS NULL AND quarantined_at IS NOT NULL",
                              (report_id,)).rowcount == 1

    def report_state(self, report_id: str) -> dict[str, Any] | None:
        row = self._tx().execute(
            "SELECT created_at, delivered_at, quarantined_at, reason, license_id FROM reports "
            "WHERE report_id = ?", (report_id,)).fetchone()
        if row is None:
            return None
        return dict(zip(("created_at", "delivered_at", "quarantined_at", "reason",
                         "license_id"), row, strict=True))

    def quarantined(self) -> list[dict[str, Any]]:
        """Reports the server refused, oldest first, with their seconds and the reason."""
        rows = self._tx().execute(
            'SELECT r.report_id, r.license_id, r.quarantined_at, r.reason, COUNT(i.id), '
            'COALESCE(SUM(i."end" - i.start), 0) FROM reports r '
            "LEFT JOIN intervals i ON i.report_id = r.report_id "
            "WHERE r.delivered_at IS NULL AND r.quarantined_at IS NOT NULL "
            "GROUP BY r.report_id ORDER BY r.created_at, r.rowid").fetchall()
        return [{"report_id": rid, "license_id": lid, "quarantined_at": at, "reason": reason,
                 "intervals": n, "seconds": round(float(s), 3)}
                for rid, lid, at, reason, n, s in rows]

    def totals(self, license_id: str | None = None) -> dict[str, Any]:
        """Seconds accrued under ``license_id`` (None: under every license): delivered or
        not, still to deliver, quarantined; seconds other licenses still have to deliver; and
        when the last report was delivered. Intervals that name no license count for
        ``license_id``: they are sealed under the license in force."""
        db = self._tx()

        def mine(lid: str | None) -> bool:
            return license_id is None or lid is None or lid == license_id

        instance = pending = quarantined = other_pending = 0.0
        quarantined_reports = 0
        for lid, seconds in db.execute(
                'SELECT license_id, COALESCE(SUM("end" - start), 0) FROM intervals '
                "WHERE report_id IS NULL GROUP BY 1"):
            if mine(lid):
                instance += seconds
                pending += seconds
            else:
                other_pending += seconds
        rows = db.execute(
            'SELECT r.license_id, r.delivered_at IS NOT NULL, r.quarantined_at IS NOT NULL, '
            'COUNT(DISTINCT r.report_id), COALESCE(SUM(i."end" - i.start), 0) FROM reports r '
            "LEFT JOIN intervals i ON i.report_id = r.report_id GROUP BY 1, 2, 3").fetchall()
        for lid, is_delivered, is_quarantined, count, seconds in rows:
            if not mine(lid):
                if not (is_delivered or is_quarantined):
                    other_pending += seconds
                continue
            instance += seconds
            if is_quarantined and not is_delivered:
                quarantined += seconds
                quarantined_reports += count
            elif not is_delivered:
                pending += seconds
        last = db.execute("SELECT MAX(delivered_at) FROM reports").fetchone()[0]
        return {"instance_seconds": float(instance), "pending_seconds": float(pending),
                "quarantined_seconds": float(quarantined),
                "quarantined_reports": quarantined_reports,
                "other_pending_seconds": float(other_pending), "last_report_at": last}

    # -- the usage log --------------------------------------------------------------------------

    def verify_log(self) -> usage_log.LogCheck:
        return usage_log.verify(usage_log.read(self._tx()))
