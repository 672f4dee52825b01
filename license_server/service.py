"""The license server's service, shared by the HTTP routes and the admin CLI: issue and check
licenses, take heartbeats and usage reports, page through usage with its cross-checks, and hand
an entitled license the presigned URLs of a published model."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from license_contract import (
    MAX_INTERVAL_S,
    MAX_REPORT_INTERVALS,
    MODEL_NAME,
    OVERLAP_TOLERANCE_S,
    SKEW_S,
    HeartbeatRequest,
    HeartbeatResponse,
    Lease,
    License,
    LicenseError,
    UsageReport,
    public_key_text,
    verify_key,
)
from license_server.billing import DAY, Interval, Refusal, day_index, day_name, parse_day
from license_server.catalog import ModelCatalog
from license_server.crosscheck import license_usage
from license_server.db import LicenseStore, ReportRules
from license_server.limits import ServerPolicy
from license_server.signing import sign_lease, sign_license
from license_server.wire import IssueRequest

LICENSE_ID = re.compile(r"^[!-~]{1,64}$")
CURSOR = re.compile(r"^([!-~]{1,64})/(\d{4}-\d{2}-\d{2})$")


class LicenseService:
    """Issue, check and account licenses; shared by the HTTP routes and the CLI."""

    def __init__(self, store: LicenseStore, signing_key: Ed25519PrivateKey, public_url: str,
                 now: Callable[[], float] = time.time,
                 policy: ServerPolicy | None = None, catalog: ModelCatalog | None = None) -> None:
        self.store = store
        self.catalog = catalog
        self.signing_key = signing_key
        self.public_url = public_url
        self.now = now
        self.policy = policy or ServerPolicy()

    @property
    def public_key(self) -> str:
        return public_key_text(self.signing_key.public_key())

    def issue(self, req: IssueRequest) -> tuple[License, str]:
        now = self.now()
        lic = License(
            license_id=f"lic_{uuid.uuid4().hex[:20]}", customer=req.customer, models=req.models,
            issued_at=now, expires_at=now + req.days * 86400, max_instances=req.max_instances,
            max_gpus=req.max_gpus, heartbeat_interval_s=req.heartbeat_interval_s,
            grace_period_s=req.grace_period_s, server_url=self.public_url, signer=self.public_key,
        )
        key = sign_license(lic, self.signing_key)
        self.store.add_license(license_id=lic.license_id, customer=lic.customer, key=key,
                               issued_at=lic.issued_at, expires_at=lic.expires_at,
                               max_instances=lic.max_instances)
        return lic, key

    def check(self, key: str) -> tuple[License, str]:
        """(license, status) for a presented key; status is active, revoked or expired."""
        lic = verify_key(key, signers={self.public_key}, check_expiry=False)
        if self.now() >= lic.expires_at:
            return lic, "expired"
        row = self.store.get_license(lic.license_id)
        if row is None:
            raise LicenseError("This license is unknown to the server.", "license_unknown")
        return lic, "revoked" if row["revoked_at"] is not None else "active"

    def _max_gap(self, lic: License) -> float:
        return max(self.policy.observe_max_gap_s, 3 * lic.heartbeat_interval_s)

    def heartbeat(self, lic: License, status: str, req: HeartbeatRequest) -> HeartbeatResponse:
        """Record what the cluster runs and answer with a lease to serve under (none for a
        revoked or expired license). A build that does not pin this server's key says it runs
        a development license: only a development server (``accept_development``) takes it."""
        if req.development and not self.policy.accept_development:
            raise Refusal("this license server does not serve development builds: the app does "
                          "not pin the vendor key that signed this license", "development_build",
                          403)
        self.store.heartbeat(lic.license_id, req.cluster_id, req.instances,
                             max_gap_s=self._max_gap(lic),
                             quarantined_reports=req.quarantined_reports,
                             quarantined_seconds=req.quarantined_seconds)
        lease = self.lease(lic, req.cluster_id, req.development) if status == "active" else None
        return HeartbeatResponse(license_id=lic.license_id, status=status, lease=lease)

    def lease(self, lic: License, cluster_id: str, development: bool) -> str:
        """A signed lease for ``cluster_id``, valid for the license's grace period (at least two
        heartbeat intervals, so that one late heartbeat does not stop serving) and never past
        the license's own expiry."""
        now = self.now()
        life = max(lic.grace_period_s, 2 * lic.heartbeat_interval_s)
        return sign_lease(Lease(
            lease_id=f"lea_{uuid.uuid4().hex}", license_id=lic.license_id, cluster_id=cluster_id,
            instances=lic.max_instances, gpus=lic.max_gpus, issued_at=now,
            expires_at=min(now + life, lic.expires_at), development=development,
            signer=self.public_key), self.signing_key)

    def report(self, lic: License, req: UsageReport) -> bool:
        """Store a usage report; False for a replay. Raises Refusal for one that cannot be.
        A report naming another license (``license_id``) is that license's usage, sent with
        the key of ``lic``: accepted for a license of the same customer (the last usage of an
        ended license, sent with its renewal's key), judged by that license's rules and billed
        to it."""
        if len(req.intervals) > MAX_REPORT_INTERVALS:
            raise Refusal(f"intervals: {len(req.intervals)} in one report, above "
                          f"{MAX_REPORT_INTERVALS}; send several reports", "too_many_intervals")
        if req.license_id is not None and req.license_id != lic.license_id:
            lic = self._same_customers(lic, req.license_id)
        rules = ReportRules(issued_at=lic.issued_at, grace_period_s=lic.grace_period_s,
                            skew_s=SKEW_S, max_interval_s=MAX_INTERVAL_S,
                            overlap_tolerance_s=OVERLAP_TOLERANCE_S)
        return self.store.add_report(
            report_id=req.report_id, license_id=lic.license_id, cluster_id=req.cluster_id,
            items=[Interval(i.instance_id, i.start, i.end, i.gpus) for i in req.intervals],
            rules=rules)

    def _same_customers(self, lic: License, license_id: str) -> License:
        row = self.store.get_license(license_id)
        if row is None:
            raise Refusal(f"license_id: no license {license_id}", "license_unknown")
        named = verify_key(row["key"], signers={self.public_key}, check_expiry=False)
        if named.customer != lic.customer:
            raise Refusal(f"license_id: license {license_id} is another customer's",
                          "license_other_customer")
        return named

    def download(self, lic: License, status: str, name: str) -> dict[str, Any]:
        """The manifest and presigned URLs of model ``name`` for an active license that covers
        it. Nothing is recorded: a download is neither an activation nor billed time."""
        if not MODEL_NAME.match(name):
            raise Refusal(f"model name {name[:64]!r}: not a model name")
        if status != "active":
            raise Refusal(f"license {lic.license_id} is {status}: no model downloads"
                          + (". Renew it with the vendor." if status == "expired" else "."),
                          f"license_{status}", 403)
        if not lic.allows_model(name):
            raise Refusal(f"license {lic.license_id} does not cover model {name!r} (it covers: "
                          f"{', '.join(lic.models)})", "model_not_licensed", 403)
        if self.catalog is None:
            raise Refusal("this license server publishes no models", "model_not_found", 404)
        return self.catalog.grant(name, self.now())

    def usage(self, license_id: str | None = None, *, day_from: str | None = None,
              day_to: str | None = None, limit: int | None = None, cursor: str | None = None,
              offset: int = 0) -> dict[str, Any]:
        """A page of usage rows (license, day) in that order, with flags and alerts.
        ``next_cursor`` continues after the page's last row; None when there is no more."""
        p = self.policy
        limit = p.page_limit if limit is None else limit
        if not 1 <= limit <= p.max_page_limit:
            raise Refusal(f"limit: between 1 and {p.max_page_limit}")
        if not 0 <= offset <= 10_000_000:
            raise Refusal("offset: between 0 and 10000000")
        if license_id is not None and not LICENSE_ID.match(license_id):
            raise Refusal("license_id: not a license id")
        now = self.now()
        try:
            first = parse_day(day_from) if day_from else 0
            # Nothing can be billed past tomorrow (intervals end by now + skew).
            last = parse_day(day_to) if day_to else day_index(now + DAY)
        except ValueError as exc:
            raise Refusal(f"from/to: {exc}") from None
        if last < first:
            raise Refusal("to: before from")
        after: tuple[str, str] | None = None
        if cursor:
            match = CURSOR.match(cursor)
            if not match:
                raise Refusal("cursor: not a cursor this server gave")
            after = (match.group(1), match.group(2))

        rows: list[dict[str, Any]] = []
        alerts: list[dict[str, Any]] = []
        skip = offset
        for lic_row in self._licenses(license_id, after):
            lid = lic_row["license_id"]
            lic = verify_key(lic_row["key"], signers={self.public_key}, check_expiry=False)
            got, warn = license_usage(
                lid, lic_row["max_instances"],
                self.store.intervals(lid, first * DAY, (last + 1) * DAY),
                self.store.observed_days(lid, day_name(first), day_name(last)),
                self.store.clusters_of(lid), first_day=first, last_day=last, now=now,
                active_now=self.store.active_instances(lid, fresh_s=self._max_gap(lic)),
                policy=p)
            got = [r for r in got if after is None or (r["license_id"], r["day"]) > after]
            if skip >= len(got):
                skip -= len(got)
                continue
            got, skip = got[skip:], 0
            rows += got
            alerts += warn
            if len(rows) > limit:
                break
        more = len(rows) > limit
        rows = rows[:limit]
        shown = {r["license_id"] for r in rows}
        return {"usage": rows, "alerts": [a for a in alerts if a["license_id"] in shown],
                "next_cursor": f"{rows[-1]['license_id']}/{rows[-1]['day']}" if more else None}

    def _licenses(self, license_id: str | None,
                  after: tuple[str, str] | None) -> Iterator[dict[str, Any]]:
        if license_id is not None:
            row = self.store.get_license(license_id)
            if row is not None and (after is None or license_id >= after[0]):
                yield row
            return
        start = None if after is None else after[0]
        if start is not None:
            row = self.store.get_license(start)
            if row is not None:
                yield row
        while True:
            batch = self.store.list_licenses(after=start, limit=100)
            yield from batch
            if len(batch) < 100:
                return
            start = batch[-1]["license_id"]
