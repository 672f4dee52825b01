"""The license server's one database layer: SQLAlchemy Core over SQLite (default, a file) or
PostgreSQL (by URL). Every write is one transaction; usage reports are idempotent by id.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

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

DAY = 86400.0


@dataclass(frozen=True)
class Interval:
    instance_id: str
    start: float
    end: float
    gpus: float = 0.0


def split_by_day(items: Iterable[Interval]) -> dict[str, dict[str, float]]:
    """Instance-seconds and GPU-seconds per UTC day; intervals crossing midnight are split."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"instance_seconds": 0.0,
                                                            "gpu_seconds": 0.0})
    for it in items:
        start = it.start
        while start < it.end:
            day_end = (start // DAY + 1) * DAY
            end = min(it.end, day_end)
            day = time.strftime("%Y-%m-%d", time.gmtime(start))
            out[day]["instance_seconds"] += end - start
            out[day]["gpu_seconds"] += (end - start) * it.gpus
            start = end
    return dict(out)


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

    def list_licenses(self) -> list[dict[str, Any]]:
        with self._begin() as conn:
            rows = conn.execute(licenses.select().order_by(licenses.c.issued_at)).all()
        return [dict(r._mapping) for r in rows]

    def revoke(self, license_id: str) -> bool:
        with self._begin() as conn:
            done = conn.execute(licenses.update()
                                .where(licenses.c.license_id == license_id)
                                .where(licenses.c.revoked_at.is_(None))
                                .values(revoked_at=self._now()))
        return done.rowcount == 1

    # -- clusters ----------------------------------------------------------------------------

    def activate(self, license_id: str, cluster_id: str) -> None:
        now = self._now()
        with self._begin() as conn:
            exists = conn.execute(clusters.select().where(
                clusters.c.license_id == license_id, clusters.c.cluster_id == cluster_id)).first()
            if exists is None:
                conn.execute(clusters.insert().values(
                    license_id=license_id, cluster_id=cluster_id, activated_at=now,
                    last_heartbeat_at=now, instances=0))

    def heartbeat(self, license_id: str, cluster_id: str, instances: int) -> None:
        now = self._now()
        with self._begin() as conn:
            done = conn.execute(clusters.update().where(
                clusters.c.license_id == license_id, clusters.c.cluster_id == cluster_id,
            ).values(last_heartbeat_at=now, instances=instances))
            if done.rowcount == 0:  # a heartbeat implies activation (e.g. server DB restored)
                conn.execute(clusters.insert().values(
                    license_id=license_id, cluster_id=cluster_id, activated_at=now,
                    last_heartbeat_at=now, instances=instances))

    def active_instances(self, license_id: str, fresh_s: float) -> int:
        cutoff = self._now() - fresh_s
        with self._begin() as conn:
            total = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(clusters.c.instances), 0))
                                 .where(clusters.c.license_id == license_id,
                                        clusters.c.last_heartbeat_at >= cutoff)).scalar_one()
        return int(total)

    # -- usage ---------------------------------------------------------------------------------

    def add_report(self, *, report_id: str, license_id: str, cluster_id: str,
                   items: list[Interval]) -> bool:
        """Store a usage report once. Returns False for a replay (already stored)."""
        seconds = sum(i.end - i.start for i in items)
        try:
            with self._begin() as conn:
                conn.execute(reports.insert().values(
                    report_id=report_id, license_id=license_id, cluster_id=cluster_id,
                    received_at=self._now(), instance_seconds=seconds))
                if items:
                    conn.execute(intervals.insert(), [
                        {"report_id": report_id, "license_id": license_id,
                         "instance_id": i.instance_id, "start": i.start, "end": i.end,
                         "gpus": i.gpus} for i in items])
        except IntegrityError:
            with self._begin() as conn:
                known = conn.execute(reports.select().where(
                    reports.c.report_id == report_id)).first()
            if known is None:  # the failure was something else
                raise
            return False
        return True

    def intervals(self, license_id: str | None = None) -> list[Interval]:
        query = sa.select(intervals.c.instance_id, intervals.c.start, intervals.c.end,
                          intervals.c.gpus)
        if license_id:
            query = query.where(intervals.c.license_id == license_id)
        with self._begin() as conn:
            rows = conn.execute(query).all()
        return [Interval(r.instance_id, r.start, r.end, r.gpus) for r in rows]

    def total_instance_seconds(self, license_id: str) -> float:
        with self._begin() as conn:
            total = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(reports.c.instance_seconds),
                                                            0.0))
                                 .where(reports.c.license_id == license_id)).scalar_one()
        return float(total)

    def usage_per_day(self, license_id: str, *, fresh_s: float) -> list[dict[str, Any]]:
        days = split_by_day(self.intervals(license_id))
        active = self.active_instances(license_id, fresh_s)
        return [
            {"license_id": license_id, "day": day,
             "instance_seconds": round(v["instance_seconds"], 3),
             "instance_hours": round(v["instance_seconds"] / 3600, 6),
             "gpu_seconds": round(v["gpu_seconds"], 3),
             "active_instances_now": active}
            for day, v in sorted(days.items())
        ]
