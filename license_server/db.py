"""The license server's one database layer: SQLAlchemy Core over SQLite (default, a file) or
PostgreSQL (by URL). Every write is one transaction; usage reports are idempotent by id.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from license_server.billing import (
    Beat,
    Coverage,
    Interval,
    Refusal,
    check_intervals,
    day_index,
    day_name,
    find_overlap,
    reach,
    reported_to,
    seen_running,
    split_by_day,
    witness,
)

__all__ = ["Interval", "LicenseStore", "ReportRules", "metadata", "split_by_day"]

metadata = sa.MetaData()

# A license's key is the bearer credential of its clusters: only its SHA-256 is kept, beside the
# fields it signs (``payload``, the license's canonical JSON), so a copy of this database lets
# no one report or download as a customer.
licenses = sa.Table(
    "licenses", metadata,
    sa.Column("license_id", sa.String(64), primary_key=True),
    sa.Column("customer", sa.String(256), nullable=False),
    sa.Column("key_sha256", sa.String(64), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("issued_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("max_instances", sa.Integer),
    sa.Column("max_gpus", sa.Float),
    sa.Column("revoked_at", sa.Float),
)

# One row per cluster of a license: what its last heartbeat said, the last lease it was given,
# how far its reports cover what its heartbeats saw (``billing.Coverage``), and what its actor
# holds back as refused (quarantined) reports.
clusters = sa.Table(
    "clusters", metadata,
    sa.Column("license_id", sa.String(64), sa.ForeignKey("licenses.license_id"), primary_key=True),
    sa.Column("cluster_id", sa.String(128), primary_key=True),
    sa.Column("activated_at", sa.Float, nullable=False),
    sa.Column("last_heartbeat_at", sa.Float),
    sa.Column("instances", sa.Integer, nullable=False, default=0),
    sa.Column("gpus", sa.Float, nullable=False, default=0.0),
    sa.Column("stopped", sa.Boolean, nullable=False, default=False),
    sa.Column("version", sa.String(64)),
    sa.Column("development", sa.Boolean),
    sa.Column("lease_id", sa.String(64)),
    sa.Column("lease_expires_at", sa.Float),
    sa.Column("unreported_since", sa.Float),
    sa.Column("covered_until", sa.Float),
    sa.Column("seen_until", sa.Float),
    sa.Column("last_report_at", sa.Float),
    sa.Column("quarantined_reports", sa.Integer, nullable=False, default=0),
    sa.Column("quarantined_seconds", sa.Float, nullable=False, default=0.0),
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
    sa.Column("cluster_id", sa.String(128), nullable=False),
    sa.Column("instance_id", sa.String(128), nullable=False),
    sa.Column("start", sa.Float, nullable=False),
    sa.Column("end", sa.Float, nullable=False),
    sa.Column("gpus", sa.Float, nullable=False),
)

# What the server saw itself, to hold the customer's reports against. Per license and hour:
# the instance- and GPU-seconds heartbeats witnessed (hours, so that a day is judged as it
# goes). Per license and day: the most instances and GPUs heartbeats reported at once, and
# the clusters refused for the cap. Per cluster and day: its heartbeats and their slow gaps.
observed_hours = sa.Table(
    "heartbeat_hours", metadata,
    sa.Column("license_id", sa.String(64), sa.ForeignKey("licenses.license_id"), primary_key=True),
    sa.Column("hour", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("observed_seconds", sa.Float, nullable=False),
    sa.Column("observed_gpu_seconds", sa.Float, nullable=False),
)

observations = sa.Table(
    "heartbeat_days", metadata,
    sa.Column("license_id", sa.String(64), sa.ForeignKey("licenses.license_id"), primary_key=True),
    sa.Column("day", sa.String(10), primary_key=True),
    sa.Column("max_instances", sa.Integer, nullable=False),
    sa.Column("max_gpus", sa.Float, nullable=False),
    sa.Column("heartbeats", sa.Integer, nullable=False),
    sa.Column("refused_clusters", sa.Integer, nullable=False),
)

cluster_days = sa.Table(
    "cluster_days", metadata,
    sa.Column("license_id", sa.String(64), sa.ForeignKey("licenses.license_id"), primary_key=True),
    sa.Column("cluster_id", sa.String(128), primary_key=True),
    sa.Column("day", sa.String(10), primary_key=True),
    sa.Column("heartbeats", sa.Integer, nullable=False),
    sa.Column("slow_gaps", sa.Integer, nullable=False),
    sa.Column("longest_gap_s", sa.Float, nullable=False),
    sa.Column("slow_after_s", sa.Float, nullable=False),
)

# Every model download granted: who (license, and cluster when the replica said), what, when.
downloads = sa.Table(
    "downloads", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("license_id", sa.String(64), sa.ForeignKey("licenses.license_id"), nullable=False),
    sa.Column("cluster_id", sa.String(128)),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("granted_at", sa.Float, nullable=False),
)

# The overlap check reads by (license, instance, start), usage pages by (license, start), the
# coverage of a cluster by (license, cluster, start), a replay by report id, and the download
# log by time. Bound to the table, they are made with it by create_all.
sa.Index("usage_intervals_instance", intervals.c.license_id, intervals.c.instance_id,
         intervals.c.start)
sa.Index("usage_intervals_start", intervals.c.license_id, intervals.c.start)
sa.Index("usage_intervals_cluster", intervals.c.license_id, intervals.c.cluster_id,
         intervals.c.start)
sa.Index("usage_intervals_report", intervals.c.report_id)
sa.Index("downloads_granted", downloads.c.granted_at)
sa.Index("downloads_license", downloads.c.license_id, downloads.c.granted_at)


@dataclass(frozen=True)
class ReportRules:
    """What a usage report is held against (the license's and the server policy's numbers)."""

    issued_at: float
    grace_period_s: float
    skew_s: float
    max_interval_s: float
    overlap_tolerance_s: float
    cover_tolerance_s: float = 0.0


@dataclass(frozen=True)
class HeartbeatRules:
    """What a heartbeat is recorded with: the margins of the license's interval, the lease it
    is answered with (None: none), and the cluster cap (None: not applied)."""

    slow_after_s: float
    cover_tolerance_s: float
    lease: tuple[str, float] | None = None
    max_clusters: int | None = None


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
        two reports cannot both pass the overlap check, nor two clusters both take the last
        place under the cluster cap."""
        conn.execute(sa.select(licenses.c.license_id).where(licenses.c.license_id == license_id)
                     .with_for_update())

    # -- licenses --------------------------------------------------------------------------

    def add_license(self, *, license_id: str, customer: str, key_sha256: str, payload: str,
                    issued_at: float, expires_at: float, max_instances: int | None,
                    max_gpus: float | None = None) -> None:
        with self._begin() as conn:
            conn.execute(licenses.insert().values(
                license_id=license_id, customer=customer, key_sha256=key_sha256,
                payload=payload, issued_at=issued_at, expires_at=expires_at,
                max_instances=max_instances, max_gpus=max_gpus))

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
                last_heartbeat_at=None, instances=0, gpus=0.0, stopped=False,
                quarantined_reports=0, quarantined_seconds=0.0))
            row = self._cluster(conn, license_id, cluster_id)
        return row

    @staticmethod
    def _admits(conn: Any, license_id: str, row: Any, now: float, max_clusters: int) -> bool:
        """Whether cluster ``row`` (None: a new one) may hold a lease: it holds one already, or
        fewer than ``max_clusters`` others do."""
        if row is not None and row.lease_expires_at is not None and row.lease_expires_at > now:
            return True
        holding = conn.execute(sa.select(sa.func.count()).select_from(clusters).where(
            clusters.c.license_id == license_id, clusters.c.lease_expires_at > now)).scalar_one()
        return int(holding) < max_clusters

    def _refuse_cluster(self, conn: Any, license_id: str, now: float) -> None:
        self._observe_day(conn, license_id, day_name(day_index(now)), refused=1)

    @staticmethod
    def _too_many(cluster_id: str, max_clusters: int) -> Refusal:
        return Refusal(f"cluster {cluster_id}: this license already has {max_clusters} clusters "
                       "holding a lease, its limit; stop one (its lease must run out) or ask the "
                       "vendor for more", "too_many_clusters", 403)

    def activate(self, license_id: str, cluster_id: str, max_clusters: int | None = None) -> None:
        now = self._now()
        with self._begin() as conn:
            self._lock(conn, license_id)
            row = self._cluster(conn, license_id, cluster_id)
            admitted = max_clusters is None or self._admits(conn, license_id, row, now,
                                                            max_clusters)
            if admitted:
                self._ensure_cluster(conn, license_id, cluster_id, now)
            else:  # counted (cluster_churn's evidence), committed, then refused
                self._refuse_cluster(conn, license_id, now)
        if not admitted:
            assert max_clusters is not None
            raise self._too_many(cluster_id, max_clusters)

    def heartbeat(self, license_id: str, cluster_id: str, beat: Beat, rules: HeartbeatRules, *,
                  version: str | None = None, development: bool | None = None,
                  quarantined_reports: int | None = None,
                  quarantined_seconds: float | None = None) -> None:
        """Record a heartbeat (its time is the store's clock, not ``beat.at``), what it and the
        cluster's previous one witnessed, and the lease it is answered with. Raises Refusal
        (403 too_many_clusters) for a cluster one over the cap."""
        now = self._now()
        beat = Beat(now, beat.instances, beat.gpus, beat.stopping)
        with self._begin() as conn:
            self._lock(conn, license_id)
            row = self._cluster(conn, license_id, cluster_id)
            admitted = (rules.lease is None or rules.max_clusters is None
                        or self._admits(conn, license_id, row, now, rules.max_clusters))
            if admitted:
                self._record_heartbeat(conn, license_id, cluster_id, beat, rules, row, {
                    "version": version, "development": development,
                    "quarantined_reports": quarantined_reports,
                    "quarantined_seconds": quarantined_seconds})
            else:
                self._refuse_cluster(conn, license_id, now)
        if not admitted:
            assert rules.max_clusters is not None
            raise self._too_many(cluster_id, rules.max_clusters)

    def _record_heartbeat(self, conn: Any, license_id: str, cluster_id: str, beat: Beat,
                          rules: HeartbeatRules, row: Any, said: dict[str, Any]) -> None:
        now = beat.at
        if row is None:
            row = self._ensure_cluster(conn, license_id, cluster_id, now)
        prev = None if row.last_heartbeat_at is None else Beat(
            row.last_heartbeat_at, row.instances, row.gpus, row.stopped)
        seen = witness(prev, beat, rules.slow_after_s)
        cov = seen_running(Coverage(row.unreported_since, row.covered_until, row.seen_until),
                           seen.running_from, now, rules.cover_tolerance_s)
        values: dict[str, Any] = {
            "last_heartbeat_at": now, "instances": beat.instances, "gpus": beat.gpus,
            "stopped": beat.stopping, "unreported_since": cov.unreported_since,
            "seen_until": cov.seen_until}
        values.update({k: v for k, v in said.items() if v is not None})
        if rules.lease is not None:
            values["lease_id"], values["lease_expires_at"] = rules.lease
        conn.execute(clusters.update().where(
            clusters.c.license_id == license_id, clusters.c.cluster_id == cluster_id,
        ).values(**values))
        for hour, (secs, gpu_secs) in sorted(seen.hours.items()):
            self._observe_hour(conn, license_id, hour, secs, gpu_secs)
        # Running at once: the clusters heard from lately that have not stopped.
        fresh = (clusters.c.license_id == license_id,
                 clusters.c.last_heartbeat_at >= now - rules.slow_after_s,
                 clusters.c.stopped.is_(False))
        running, gpus = conn.execute(sa.select(
            sa.func.coalesce(sa.func.sum(clusters.c.instances), 0),
            sa.func.coalesce(sa.func.sum(clusters.c.gpus), 0.0)).where(*fresh)).one()
        day = day_name(day_index(now))
        self._observe_day(conn, license_id, day, instances=int(running), gpus=float(gpus),
                          beats=1)
        slow = seen.slow and seen.gap_s is not None
        self._observe_cluster_day(conn, license_id, cluster_id, day, int(slow),
                                  seen.gap_s if slow else 0.0, rules.slow_after_s)

    @staticmethod
    def _upsert(conn: Any, table: sa.Table, key: dict[str, Any], add: dict[str, Any],
                top: dict[str, Any], fixed: dict[str, Any] | None = None) -> None:
        """Add ``add`` to, and raise to at least ``top``, the row at ``key``, made if absent."""
        where = [table.c[k] == v for k, v in key.items()]
        row = conn.execute(table.select().where(*where)).first()
        if row is None:
            conn.execute(table.insert().values(**key, **add, **top, **(fixed or {})))
            return
        conn.execute(table.update().where(*where).values(
            **{k: getattr(row, k) + v for k, v in add.items()},
            **{k: max(getattr(row, k), v) for k, v in top.items()}, **(fixed or {})))

    def _observe_hour(self, conn: Any, license_id: str, hour: int, seconds: float,
                      gpu_seconds: float) -> None:
        self._upsert(conn, observed_hours, {"license_id": license_id, "hour": hour},
                     {"observed_seconds": seconds, "observed_gpu_seconds": gpu_seconds}, {})

    def _observe_day(self, conn: Any, license_id: str, day: str, instances: int = 0,
                     gpus: float = 0.0, beats: int = 0, refused: int = 0) -> None:
        self._upsert(conn, observations, {"license_id": license_id, "day": day},
                     {"heartbeats": beats, "refused_clusters": refused},
                     {"max_instances": instances, "max_gpus": gpus})

    def _observe_cluster_day(self, conn: Any, license_id: str, cluster_id: str, day: str,
                             slow: int, gap_s: float, slow_after_s: float) -> None:
        self._upsert(conn, cluster_days,
                     {"license_id": license_id, "cluster_id": cluster_id, "day": day},
                     {"heartbeats": 1, "slow_gaps": slow}, {"longest_gap_s": gap_s},
                     {"slow_after_s": slow_after_s})

    def active_instances(self, license_id: str, fresh_s: float) -> int:
        cutoff = self._now() - fresh_s
        with self._begin() as conn:
            total = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(clusters.c.instances), 0))
                                 .where(clusters.c.license_id == license_id,
                                        clusters.c.last_heartbeat_at >= cutoff,
                                        clusters.c.stopped.is_(False))).scalar_one()
        return int(total)

    def clusters_of(self, license_id: str) -> list[dict[str, Any]]:
        query = (clusters.select().where(clusters.c.license_id == license_id)
                 .order_by(clusters.c.cluster_id))
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
                    {"report_id": report_id, "license_id": license_id, "cluster_id": cluster_id,
                     "instance_id": i.instance_id, "start": i.start, "end": i.end,
                     "gpus": i.gpus} for i in items])
            values: dict[str, Any] = {"last_report_at": now}
            if items:  # an empty report covers nothing
                cov = self._covered(conn, license_id, cluster, items, rules)
                values.update(unreported_since=cov.unreported_since,
                              covered_until=cov.covered_until)
            conn.execute(clusters.update().where(
                clusters.c.license_id == license_id, clusters.c.cluster_id == cluster_id,
            ).values(**values))
        return True

    @staticmethod
    def _covered(conn: Any, license_id: str, cluster: Any, items: list[Interval],
                 rules: ReportRules | None) -> Coverage:
        """The cluster's coverage once ``items`` are stored: with running time unreported, how
        far all its stored intervals reach from there without a hole (reports may arrive out of
        order); else how far these reach."""
        tolerance = rules.cover_tolerance_s if rules is not None else 0.0
        longest = rules.max_interval_s if rules is not None else math.inf
        cov = Coverage(cluster.unreported_since, cluster.covered_until, cluster.seen_until)
        since = cov.unreported_since
        if since is None:
            return reported_to(cov, max(i.end for i in items), tolerance)
        query = (sa.select(intervals.c.start, intervals.c.end)
                 .where(intervals.c.license_id == license_id,
                        intervals.c.cluster_id == cluster.cluster_id,
                        intervals.c.end > since - tolerance)
                 .order_by(intervals.c.start))
        if math.isfinite(longest):  # intervals are at most this long: keeps the scan short
            query = query.where(intervals.c.start > since - tolerance - longest)
        result = conn.execute(query.execution_options(yield_per=2000))
        try:
            got = reach(since, ((r.start, r.end) for r in result), tolerance)
        finally:
            result.close()
        return reported_to(cov, got, tolerance)

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

    def observed_hours(self, license_id: str, first: int, last: int) -> list[dict[str, Any]]:
        """Heartbeat-witnessed seconds of hours ``first..last`` (hour indexes)."""
        query = observed_hours.select().where(
            observed_hours.c.license_id == license_id, observed_hours.c.hour >= first,
            observed_hours.c.hour <= last).order_by(observed_hours.c.hour)
        with self._begin() as conn:
            return [dict(r._mapping) for r in conn.execute(query).all()]

    def cluster_days(self, license_id: str, first: str, last: str) -> list[dict[str, Any]]:
        query = cluster_days.select().where(
            cluster_days.c.license_id == license_id, cluster_days.c.day >= first,
            cluster_days.c.day <= last).order_by(cluster_days.c.day, cluster_days.c.cluster_id)
        with self._begin() as conn:
            return [dict(r._mapping) for r in conn.execute(query).all()]

    def total_instance_seconds(self, license_id: str) -> float:
        with self._begin() as conn:
            total = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(reports.c.instance_seconds),
                                                            0.0))
                                 .where(reports.c.license_id == license_id)).scalar_one()
        return float(total)

    # -- downloads -----------------------------------------------------------------------------

    def record_download(self, license_id: str, cluster_id: str | None, model: str) -> None:
        with self._begin() as conn:
            conn.execute(downloads.insert().values(
                license_id=license_id, cluster_id=cluster_id, model=model,
                granted_at=self._now()))

    def downloads(self, license_id: str | None = None, *, before: int | None = None,
                  limit: int = 100) -> list[dict[str, Any]]:
        """Download grants, newest first; ``before`` continues after a page's last ``id``."""
        query = downloads.select().order_by(downloads.c.id.desc()).limit(limit)
        if license_id is not None:
            query = query.where(downloads.c.license_id == license_id)
        if before is not None:
            query = query.where(downloads.c.id < before)
        with self._begin() as conn:
            return [dict(r._mapping) for r in conn.execute(query).all()]
