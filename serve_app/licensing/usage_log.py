"""The customer's own record of what was billed: a hash-chained log of delivered usage reports.

An air-gapped installation (``airgap.py``) logs in it what it cannot send: its sealed reports,
and beat, start and stop entries (``license_contract.UsageEntry``), which it carries to the
vendor in signed bundles.

Every report the license server accepts is appended, in the same SQLite transaction that marks it
delivered in the ledger (so a crash can neither log an undelivered report nor deliver an unlogged
one). An entry is canonical JSON holding the report (id, license, cluster, intervals) and
``prev``, the hash of the entry before it; its own hash is the SHA-256 of that JSON. Changing,
inserting or removing any entry but the newest breaks the chain at that point; ``verify`` says
where. Keep the head hash that ``verify`` prints to also catch a truncated tail.

Per-day totals split intervals at UTC midnight exactly as the license server's
``GET /admin/usage`` does, so the two can be compared line by line.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, report_id TEXT NOT NULL UNIQUE,
    entry TEXT NOT NULL, hash TEXT NOT NULL);
"""
GENESIS = "0" * 64
DAY = 86400.0


def encode(entry: dict[str, Any]) -> str:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), allow_nan=False)


def entry_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def append(db: sqlite3.Connection, entry: dict[str, Any], key: str | None = None) -> bool:
    """Append a delivered report inside the caller's transaction; False when it is already
    logged (a replay the server answered as a duplicate). ``key``: the entry's unique index
    when it is not a report (an air-gapped installation's beat, start and stop entries)."""
    key = key or entry["report_id"]
    known = db.execute("SELECT 1 FROM usage_log WHERE report_id = ?", (key,)).fetchone()
    if known:
        return False
    text = encode({**entry, "prev": head(db)})
    db.execute("INSERT INTO usage_log(report_id, entry, hash) VALUES (?, ?, ?)",
               (key, text, entry_hash(text)))
    return True


def head(db: sqlite3.Connection) -> str:
    """The hash of the log's last entry (GENESIS for an empty log)."""
    row = db.execute("SELECT hash FROM usage_log ORDER BY seq DESC LIMIT 1").fetchone()
    return row[0] if row else GENESIS


def after(db: sqlite3.Connection, known: str) -> list[tuple[int, str, str]] | None:
    """(seq, entry, hash) of every entry after the one whose hash is ``known`` (GENESIS: all),
    in order; None when no entry has that hash."""
    seq = 0
    if known != GENESIS:
        row = db.execute("SELECT seq FROM usage_log WHERE hash = ? ORDER BY seq LIMIT 1",
                         (known,)).fetchone()
        if row is None:
            return None
        seq = row[0]
    return db.execute("SELECT seq, entry, hash FROM usage_log WHERE seq > ? ORDER BY seq",
                      (seq,)).fetchall()


def read(db: sqlite3.Connection) -> list[tuple[int, str, str, str]]:
    """(seq, report_id, entry, hash) in order."""
    return db.execute("SELECT seq, report_id, entry, hash FROM usage_log ORDER BY seq").fetchall()


@dataclass
class LogCheck:
    entries: int = 0
    reports: int = 0  # entries that hold a report (the rest: an air-gapped log's beats and runs)
    head: str = GENESIS
    problems: list[str] = field(default_factory=list)
    days: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(rows: Iterable[tuple[int, str, str, str]]) -> LogCheck:
    """Check the chain and total the intervals per license and UTC day."""
    check = LogCheck()
    prev = GENESIS
    per_day: dict[tuple[str, str], dict[str, float]] = defaultdict(
        lambda: {"instance_seconds": 0.0, "gpu_seconds": 0.0})
    for seq, report_id, text, stored in rows:
        check.entries += 1
        if entry_hash(text) != stored:
            check.problems.append(f"entry {seq} ({report_id}): its content does not match its "
                                  "hash (the entry was changed)")
        try:
            entry = json.loads(text)
        except ValueError:
            check.problems.append(f"entry {seq} ({report_id}): not valid JSON")
            prev = stored
            continue
        if entry.get("prev") != prev:
            check.problems.append(f"entry {seq} ({report_id}): does not follow the entry before "
                                  "it (an entry was removed, inserted or rewritten)")
        if "report_id" in entry:
            check.reports += 1
        if entry.get("report_id", report_id) != report_id:
            check.problems.append(f"entry {seq}: holds report {entry.get('report_id')}, "
                                  f"indexed as {report_id}")
        prev = stored
        for day, seconds in split_by_day(entry.get("intervals", [])).items():
            totals = per_day[(entry.get("license_id") or "unknown", day)]
            totals["instance_seconds"] += seconds["instance_seconds"]
            totals["gpu_seconds"] += seconds["gpu_seconds"]
    check.head = prev
    check.days = [
        {"license_id": lid, "day": day, "instance_seconds": round(v["instance_seconds"], 3),
         "instance_hours": round(v["instance_seconds"] / 3600, 6),
         "gpu_seconds": round(v["gpu_seconds"], 3)}
        for (lid, day), v in sorted(per_day.items())
    ]
    return check


def split_by_day(intervals: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Instance- and GPU-seconds per UTC day; an interval crossing midnight is split there (the
    license server's own arithmetic, so totals agree to the last digit printed)."""
    out: dict[str, dict[str, float]] = defaultdict(
        lambda: {"instance_seconds": 0.0, "gpu_seconds": 0.0})
    for it in intervals:
        start, stop, gpus = float(it["start"]), float(it["end"]), float(it.get("gpus", 0.0))
        while start < stop:
            end = min(stop, (start // DAY + 1) * DAY)
            day = time.strftime("%Y-%m-%d", time.gmtime(start))
            out[day]["instance_seconds"] += end - start
            out[day]["gpu_seconds"] += (end - start) * gpus
            start = end
    return dict(out)
