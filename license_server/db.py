"""The license server's one database layer: SQLAlchemy Core over SQLite (default, a file) or
PostgreSQL (by URL). Every write is one transaction; usage reports are idempotent by id.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from license_server.billing import (
    Interval,
    Refusal,
    check_intervals,
    day_index,
    day_name,
    find_overlap,
    observe,
    split_by_day,
)

__all__ = ["Interval", "LicenseStore", "ReportRules", "metadata", "split_by_day"]

metadata = sa.MetaData()

licenses = sa.Table(
    "licenses", metadata,
    sa.Column("license_id", sa.String(64), primary_key=True),
    sa.Column("customer", sa.String(256), nullable=False),
    sa.Column("key", sa.Text, nullable=False),
    sa.Column("issued_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("max_instances", sa.Integer),
    sa.Column("revoked_at", sa.Float),
)

clusters = sa.Table(
    "clusters", metadata,
    sa.Column("license_id", sa.String(64), sa.ForeignKey("licenses.license_id"), primary_key=True),
    sa.Column("cluster_id", sa.String(128), primary_key=True),
    sa.Column("activated_at", sa.Float, nullable=False),
    sa.Column("last_heartbeat_at", sa.Float),
    sa.Column("instances", sa.Integer, nullable=False, default=0),
)

reports = sa.Table(
    "usage_reports", metadata,
    sa.Column("report_id", sa.String(64), primary_key=True),
    sa.Column("license_id", sa.String(64), sa.ForeignKey("licenses.license_id"), nullable=False),
    sa.Column("cluster_id", sa.String(128), nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("instance_seconds", sa.Float, nullable=False),
)

intervals = sa.Table(
    "usage_intervals", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("report_id", sa.String(64), sa.ForeignKey("usage_reports.report_id"), nullable=False),
    sa.Column("license_id", sa.String(64), nullable=False, index=True),
    sa.Column("instance_id", sa.String(128), nullable=False),
    sa.Column("start", sa.Float, nullable=False),
    sa.Column("end", sa.Float, nullable=False),
    sa.Column("gpus", sa.Float, nullable=False),
)

# Heartbeat-observed instance time per license and day, and the most instances heartbeats
# reported at once: what the server saw itself, to hold the customer's reports against.
observations = sa.Table(
    "heartbeat_days", metadata,
    sa.Column("license_id", sa.String(64), sa.ForeignKey("licenses.license_id"), primary_key=True),
    sa.Column("day", sa.String(10), primary_key=True),
    sa.Column("observed_seconds", sa.Float, nullable=False),
    sa.Column("max_instances", sa.Integer, nullable=False),
    sa.Column("heartbeats", sa.Integer, nullable=False),
)

# Per cluster: since when heartbeats said instances run with no report following, and what
# the actor holds back as refused (quarantined) reports.
watch = sa.Table(
    "cluster_watch", metadata,
    sa.Column("license_id", sa.String(64), sa.ForeignKey("licenses.license_id"), primary_key=True),
    sa.Column("cluster_id", sa.String(128), primary_key=True),
    sa.Column("unreported_since", sa.Float),
    sa.Column("last_report_at", sa.Float),
    sa.Column("quarantined_reports", sa.Integer, nullable=False, default=0),
    sa.Column("quarantined_seconds", sa.Float, nullable=False, default=0.0),
)

# The overlap check reads by (license, instance, start), usage pages by (license, start), and a
# replay by report id. Bound to the table, they are made with it by create_all.
sa.Index("usage_intervals_instance", intervals.c.license_id, intervals.c.instance_id,
         intervals.c.start)
sa.Index("usage_intervals_start", intervals.c.license_id, intervals.c.start)
sa.Index("usage_intervals_report", intervals.c.report_id)


@dataclass(frozen=True)
class ReportRules:
    """What a usage report is held against (the license's and the server policy's numbers)."""

    issued_at: float
    grace_period_s: float
    skew_s: float
    max_interval_s: float
    overlap_tolerance_s: float


class LicenseStore:
    """All persistence of the license server."""

    def __init__(self, url: str, now: Callable[[], float] = time.time) -> None:
        self._url = url
        self._now = now
        self.engine: sa.Engine | None = None

    def start(self) -> LicenseStore:
        kwargs: dict[str, Any] = {"future": True}
        if self._url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True  # a restarted PostgreSQL is a stale pool, not a 500
        self.engine = sa.create_engine(self._url, **kwargs)
        if self._url.startswith("sqlite"):
            @sa.event.listens_for(self.engine, "connect")
            def _wal(dbapi_conn: Any, _: Any) -> None:  # concurrent readers while writing
                dbapi_conn.execute("PRAGMA journal_mode=WAL")
                dbapi_conn.execute("PRAGMA synchronous=FULL")
        metadata.create_all(self.engine)
        return self

    def _begin(self) -> Any:
        assert self.engine is not None, "call start() first"
        return self.engine.begin()

    @staticmethod
    def _lock(conn: Any, license_id: str) -> None:
        """Serialize one license's writes (PostgreSQL; SQLite writers are serial anyway), so
        two reports cannot both pass the overlap check."""
        conn.execute(sa.select(licenses.c.license_id).where(licenses.c.license_id == license_id)
                     .with_for_update())

    # -- licenses --------------------------------------------------------------------------

    def add_license(self, *, license_id: str, customer: str, key: str, issued_at: float,
                    expires_at: float, max_instances: int | None) -> None:
        with self._begin() as conn:
            conn.execute(licenses.insert().values(
                license_id=license_id, customer=customer, key=key, issued_at=issued_at,
                expires_at=expires_at, max_instances=max_instances))

    def get_license(self, license_id: str) -> dict[str, Any] | None:
        with self._begin() as conn:
            row = conn.execute(licenses.select().where(licenses.c.license_id == license_id)).first()
        return dict(row._mapping) if row else None

    def list_licenses(self, after: str | None = None, limit: int | None = None
                      ) -> list[dict[str, Any]]:
        """Licenses by id (the order admin pages walk), from after ``after``."""
        query = licenses.select().order_by(licenses.c.license_id)
        if after is not None:
            query = query.where(licenses.c.license_id > after)
        if limit is not None:
            query = query.limit(limit)
        with self._begin() as conn:
            rows = conn.execute(query).all()
        return [dict(r._mapping) for r in rows]

    def revoke(self, license_id: str) -> bool:
        with self._begin() as conn:
            done = conn.execute(licenses.update()
                                .where(licenses.c.license_id == license_id)
                                .where(licenses.c.revoked_at.is_(None))
                                .values(revoked_at=self._now()))
        return done.rowcount == 1

    # -- clusters ----------------------------------------------------------------------------

    @staticmethod
    def _cluster(conn: Any, license_id: str, cluster_id: str) -> Any:
        return conn.execute(clusters.select().where(
            clusters.c.license_id == license_id, clusters.c.cluster_id == cluster_id)).first()

    def _ensure_cluster(self, conn: Any, license_id: str, cluster_id: str, now: float) -> Any:
        """The cluster's row, made now if it is new (a heartbeat or report implies activation,
        e.g. after the server's database was restored)."""
        row = self._cluster(conn, license_id, cluster_id)
        if row is None:
            conn.execute(clusters.insert().values(
                license_id=license_id, cluster_id=cluster_id, activated_at=now,
                last_heartbeat_at=None, instances=0))
            conn.execute(watch.insert().values(
                license_id=license_id, cluster_id=cluster_id, quarantined_reports=0,
                quarantined_seconds=0.0))
            row = self._cluster(conn, license_id, cluster_id)
        return row

    def activate(self, license_id: str, cluster_id: str) -> None:
        with self._begin() as conn:
            self._lock(conn, license_id)
            self._ensure_cluster(conn, license_id, cluster_id, self._now())

    def heartbeat(self, license_id: str, cluster_id: str, instances: int, *,
                  max_gap_s: float = 180.0, quarantined_reports: int | None = None,
                  quarantined_seconds: float | None = None) -> None:
        """Record a heartbeat, and what it and the cluster's previous one witnessed."""
        now = self._now()
        with self._begin() as conn:
            self._lock(conn, license_id)
            prev = self._ensure_cluster(conn, license_id, cluster_id, now)
            conn.execute(clusters.update().where(
                clusters.c.license_id == license_id, clusters.c.cluster_id == cluster_id,
            ).values(last_heartbeat_at=now, instances=instances))
            seen = observe(prev.last_heartbeat_at, prev.instances, now, instances, max_gap_s)
            running = int(conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(clusters.c.instances), 0))
                .where(clusters.c.license_id == license_id,
                       clusters.c.last_heartbeat_at >= now - max_gap_s)).scalar_one())
            beat_day = day_name(day_index(now))
            for day in sorted(set(seen) | {beat_day}):
                self._observe_day(conn, license_id, day, seen.get(day, 0.0),
                                  running if day == beat_day else 0, int(day == beat_day))
            values: dict[str, Any] = {}
            if quarantined_reports is not None:
                values["quarantined_reports"] = quarantined_reports
            if quarantined_seconds is not None:
                values["quarantined_seconds"] = quarantined_seconds
            if instances > 0:
                values["unreported_since"] = sa.func.coalesce(watch.c.unreported_since, now)
            if values:
                conn.execute(watch.update().where(
                    watch.c.license_id == license_id, watch.c.cluster_id == cluster_id,
                ).values(**values))

    @staticmethod
    def _observe_day(conn: Any, license_id: str, day: str, seconds: float, running: int,
                     beats: int) -> None:
        key = (observations.c.license_id == license_id, observations.c.day == day)
        row = conn.execute(observations.select().where(*key)).first()
        if row is None:
            conn.execute(observations.insert().values(
                license_id=license_id, day=day, observed_seconds=seconds,
                max_instances=running, heartbeats=beats))
        else:
            conn.execute(observations.update().where(*key).values(
                observed_seconds=row.observed_seconds + seconds,
                max_instances=max(row.max_instances, running), heartbeats=row.heartbeats + beats))

    def active_instances(self, license_id: str, fresh_s: float) -> int:
        cutoff = self._now() - fresh_s
        with self._begin() as conn:
            total = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(clusters.c.instances), 0))
                                 .where(clusters.c.license_id == license_id,
                                        clusters.c.last_heartbeat_at >= cutoff)).scalar_one()
        return int(total)

    def clusters_of(self, license_id: str) -> list[dict[str, Any]]:
        query = (sa.select(clusters, watch.c.unreported_since, watch.c.last_report_at,
                           watch.c.quarantined_reports, watch.c.quarantined_seconds)
                 .select_from(clusters.outerjoin(watch, sa.and_(
                     watch.c.license_id == clusters.c.license_id,
                     watch.c.cluster_id == clusters.c.cluster_id)))
                 .where(clusters.c.license_id == license_id).order_by(clusters.c.cluster_id))
        with self._begin() as conn:
            return [dict(r._mapping) for r in conn.execute(query).all()]

    # -- usage ---------------------------------------------------------------------------------

    def add_report(self, *, report_id: str, license_id: str, cluster_id: str,
                   items: list[Interval], rules: ReportRules | None = None) -> bool:
        """Store a usage report once: True when stored, False for a replay of the same report.
        With ``rules``, raise Refusal for a report that cannot be true (see billing)."""
        try:
            return self._add_report(report_id, license_id, cluster_id, items, rules)
        except IntegrityError:  # the same id stored meanwhile (another license, or process)
            with self._begin() as conn:
                known = conn.execute(reports.select().where(
                    reports.c.report_id == report_id)).first()
                if known is None:  # the failure was something else
                    raise
                self._check_replay(conn, known, license_id, items)
            return False

    def _add_report(self, report_id: str, license_id: str, cluster_id: str,
                    items: list[Interval], rules: ReportRules | None) -> bool:
        now = self._now()
        with self._begin() as conn:
            self._lock(conn, license_id)
            known = conn.execute(reports.select().where(reports.c.report_id == report_id)).first()
            if known is not None:
                self._check_replay(conn, known, license_id, items)
                return False
            cluster = self._ensure_cluster(conn, license_id, cluster_id, now)
            if rules is not None:
                self._check_report(conn, license_id, cluster.activated_at, items, rules, now)
            conn.execute(reports.insert().values(
                report_id=report_id, license_id=license_id, cluster_id=cluster_id,
                received_at=now, instance_seconds=sum(i.end - i.start for i in items)))
            if items:
                conn.execute(intervals.insert(), [
                    {"report_id": report_id, "license_id": license_id,
                     "instance_id": i.instance_id, "start": i.start, "end": i.end,
                     "gpus": i.gpus} for i in items])
            conn.execute(watch.update().where(
                watch.c.license_id == license_id, watch.c.cluster_id == cluster_id,
            ).values(unreported_since=None, last_report_at=now))
        return True

    @staticmethod
    def _check_replay(conn: Any, known: Any, license_id: str, items: list[Interval]) -> None:
        stored = conn.execute(sa.select(intervals.c.instance_id, intervals.c.start,
                                        intervals.c.end, intervals.c.gpus)
                              .where(intervals.c.report_id == known.report_id)).all()
        same = sorted(tuple(r) for r in stored) == sorted(
            (i.instance_id, i.start, i.end, i.gpus) for i in items)
        if known.license_id != license_id or not same:
            raise Refusal(f"report_id {known.report_id} was already used for a different "
                          "report; a new report needs a new id", "report_id_conflict", 409)

    @staticmethod
    def _check_report(conn: Any, license_id: str, activated_at: float, items: list[Interval],
                      rules: ReportRules, now: float) -> None:
        # The actor accrues from its first start, which may precede a successful activation
        # by up to the grace period (the license server was unreachable).
        lower = max(rules.issued_at, activated_at - rules.grace_period_s) - rules.skew_s
        check_intervals(items, lower=lower, upper=now + rules.skew_s,
                        max_len=rules.max_interval_s)
        if not items:
            return
        ids = sorted({i.instance_id for i in items})
        lo = min(i.start for i in items) - rules.overlap_tolerance_s
        hi = max(i.end for i in items) + rules.overlap_tolerance_s
        billed = conn.execute(
            sa.select(intervals.c.instance_id, intervals.c.start, intervals.c.end)
            .where(intervals.c.license_id == license_id, intervals.c.instance_id.in_(ids),
                   intervals.c.start < hi, intervals.c.end > lo,
                   # intervals are at most max_interval_s long: keeps the index scan short
                   intervals.c.start > lo - rules.max_interval_s)).all()
        overlap = find_overlap(items, (Interval(r.instance_id, r.start, r.end) for r in billed),
                               rules.overlap_tolerance_s)
        if overlap:
            raise Refusal(overlap, "usage_overlap", 409)

    def intervals(self, license_id: str | None = None, lo: float | None = None,
                  hi: float | None = None) -> Iterator[Interval]:
        """Billed intervals touching [lo, hi), by start, streamed from the database."""
        query = sa.select(intervals.c.instance_id, intervals.c.start, intervals.c.end,
                          intervals.c.gpus).order_by(intervals.c.start, intervals.c.id)
        if license_id:
            query = query.where(intervals.c.license_id == license_id)
        if lo is not None:
            query = query.where(intervals.c.end > lo)
        if hi is not None:
            query = query.where(intervals.c.start < hi)
        with self._begin() as conn:
            for r in conn.execution_options(yield_per=2000).execute(query):
                yield Interval(r.instance_id, r.start, r.end, r.gpus)

    def observed_days(self, license_id: str, first: str, last: str) -> list[dict[str, Any]]:
        query = observations.select().where(
            observations.c.license_id == license_id, observations.c.day >= first,
            observations.c.day <= last).order_by(observations.c.day)
        with self._begin() as conn:
            return [dict(r._mapping) for r in conn.execute(query).all()]

    def total_instance_seconds(self, license_id: str) -> float:
        with self._begin() as conn:
            total = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(reports.c.instance_seconds),
                                                            0.0))
                                 .where(reports.c.license_id == license_id)).scalar_one()
        return float(total)
