"""The license server's service, shared by the HTTP routes and the admin CLI: issue and check
licenses, take heartbeats and usage reports, page through usage with its cross-checks, show a
license's clusters, and hand an entitled license the presigned URLs of a published model (and
record that it did)."""

from __future__ import annotations

import hashlib
import hmac
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
    canonical,
    public_key_text,
    verify_key,
)
from license_server.billing import DAY, Beat, Interval, Refusal, day_index, day_name, parse_day
from license_server.catalog import ModelCatalog
from license_server.crosscheck import LicenseFacts, license_usage
from license_server.db import HeartbeatRules, LicenseStore, ReportRules
from license_server.limits import ServerPolicy
from license_server.signing import sign_lease, sign_license
from license_server.wire import IssueRequest

LICENSE_ID = re.compile(r"^[!-~]{1,64}$")
CURSOR = re.compile(r"^([!-~]{1,64})/(\d{4}-\d{2}-\d{2})$")
# Reported intervals end at the replicas' last heartbeat to the actor, which may trail the
# actor's heartbeat to this server by an interval, and a clean stop's last report may precede
# its last heartbeat by another: within that, reports cover what heartbeats saw.
COVER_SLACK_S = 10.0


def key_digest(key: str) -> str:
    """What the store keeps of a key (canonical base64 gives a document one spelling)."""
    return hashlib.sha256(key.encode()).hexdigest()


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
        self.record_issued(lic, key)
        return lic, key

    def record_issued(self, lic: License, key: str) -> None:
        """Keep an issued license: its fields and its key's hash, never the key."""
        self.store.add_license(license_id=lic.license_id, customer=lic.customer,
                               key_sha256=key_digest(key), payload=canonical(lic).decode(),
                               issued_at=lic.issued_at, expires_at=lic.expires_at,
                               max_instances=lic.max_instances, max_gpus=lic.max_gpus)

    def check(self, key: str) -> tuple[License, str]:
        """(license, status) for a presented key; status is active, revoked or expired. The key
        must be signed by this server and be the very key it issued under that id."""
        lic = verify_key(key, signers={self.public_key}, check_expiry=False)
        row = self.store.get_license(lic.license_id)
        if row is None or not hmac.compare_digest(row["key_sha256"], key_digest(key)):
            raise LicenseError("This license is unknown to the server.", "license_unknown")
        if self.now() >= lic.expires_at:
            return lic, "expired"
        return lic, "revoked" if row["revoked_at"] is not None else "active"

    @staticmethod
    def stored_license(row: dict[str, Any]) -> License:
        """The license of a ``licenses`` row, from the fields its key signed."""
        return License.model_validate_json(row["payload"])

    def slow_after_s(self, lic: License) -> float:
        """Heartbeats of a cluster further apart than this are slow (``heartbeats_slow``)."""
        p = self.policy
        return max(p.heartbeat_slow_intervals * lic.heartbeat_interval_s, p.heartbeat_slow_floor_s)

    def silent_after_s(self, lic: License) -> float:
        """A cluster not heard from for this long, not stopped, is silent (``cluster_silent``)."""
        p = self.policy
        return max(p.silent_intervals * lic.heartbeat_interval_s, p.heartbeat_slow_floor_s)

    @staticmethod
    def cover_tolerance_s(lic: License) -> float:
        return 2 * lic.heartbeat_interval_s + COVER_SLACK_S

    def activate(self, lic: License, status: str, cluster_id: str) -> None:
        """Record a cluster's activation; refused (403 too_many_clusters) for one more cluster
        than the cap allows, as long as the license is active."""
        self.store.activate(lic.license_id, cluster_id,
                            max_clusters=self.policy.max_clusters if status == "active" else None)

    def heartbeat(self, lic: License, status: str, req: HeartbeatRequest) -> HeartbeatResponse:
        """Record what the cluster runs and answer with a lease to serve under: none for a
        revoked or expired license, nor for a cluster that says it stops. A build that does not
        pin this server's key says it runs a development license: only a development server
        (``accept_development``) takes it. The cluster one over the cap is refused (403)."""
        if req.development and not self.policy.accept_development:
            raise Refusal("this license server does not serve development builds: the app does "
                          "not pin the vendor key that signed this license", "development_build",
                          403)
        lease = None
        if status == "active" and not req.stopping:
            lease = self._lease(lic, req.cluster_id, req.development)
        self.store.heartbeat(
            lic.license_id, req.cluster_id, Beat(self.now(), req.instances, req.gpus, req.stopping),
            HeartbeatRules(slow_after_s=self.slow_after_s(lic),
                           cover_tolerance_s=self.cover_tolerance_s(lic),
                           lease=None if lease is None else (lease.lease_id, lease.expires_at),
                           max_clusters=self.policy.max_clusters),
            version=req.version, development=req.development,
            quarantined_reports=req.quarantined_reports,
            quarantined_seconds=req.quarantined_seconds)
        return HeartbeatResponse(license_id=lic.license_id, status=status,
                                 lease=None if lease is None else sign_lease(lease,
                                                                             self.signing_key))

    def lease(self, lic: License, cluster_id: str, development: bool) -> str:
        """A signed lease for ``cluster_id`` (see ``_lease``)."""
        return sign_lease(self._lease(lic, cluster_id, development), self.signing_key)

    def _lease(self, lic: License, cluster_id: str, development: bool) -> Lease:
        """A lease for ``cluster_id``, valid for the license's grace period (at least two
        heartbeat intervals, so that one late heartbeat does not stop serving) and never past
        the license's own expiry."""
        now = self.now()
        life = max(lic.grace_period_s, 2 * lic.heartbeat_interval_s)
        return Lease(
            lease_id=f"lea_{uuid.uuid4().hex}", license_id=lic.license_id, cluster_id=cluster_id,
            instances=lic.max_instances, gpus=lic.max_gpus, issued_at=now,
            expires_at=min(now + life, lic.expires_at), development=development,
            signer=self.public_key)

    def report(self, lic: License, req: UsageReport) -> bool:
        """Store a usage report; False for a replay. Raises Refusal for one that cannot be."""
        if len(req.intervals) > MAX_REPORT_INTERVALS:
            raise Refusal(f"intervals: {len(req.intervals)} in one report, above "
                          f"{MAX_REPORT_INTERVALS}; send several reports", "too_many_intervals")
        rules = ReportRules(issued_at=lic.issued_at, grace_period_s=lic.grace_period_s,
                            skew_s=SKEW_S, max_interval_s=MAX_INTERVAL_S,
                            overlap_tolerance_s=OVERLAP_TOLERANCE_S,
                            cover_tolerance_s=self.cover_tolerance_s(lic))
        return self.store.add_report(
            report_id=req.report_id, license_id=lic.license_id, cluster_id=req.cluster_id,
            items=[Interval(i.instance_id, i.start, i.end, i.gpus) for i in req.intervals],
            rules=rules)

    def download(self, lic: License, status: str, name: str,
                 cluster_id: str | None = None) -> dict[str, Any]:
        """The manifest and presigned URLs of model ``name`` for an active license that covers
        it. Not billed time, but recorded: license, cluster (when the replica says), model and
        time of every grant (``downloads``)."""
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
        grant = self.catalog.grant(name, self.now(), self.signing_key)
        self.store.record_download(lic.license_id, cluster_id, name)
        return grant

    def downloads(self, license_id: str | None = None, *, limit: int = 100,
                  before: int | None = None) -> dict[str, Any]:
        """A page of download grants, newest first; ``next_before`` continues it."""
        if license_id is not None and not LICENSE_ID.match(license_id):
            raise Refusal("license_id: not a license id")
        if not 1 <= limit <= self.policy.max_page_limit:
            raise Refusal(f"limit: between 1 and {self.policy.max_page_limit}")
        if before is not None and not 0 <= before <= 2**62:
            raise Refusal("before: not a download id this server gave")
        rows = self.store.downloads(license_id, before=before, limit=limit)
        return {"downloads": rows,
                "next_before": rows[-1]["id"] if len(rows) == limit else None}

    def clusters(self, license_id: str) -> dict[str, Any]:
        """Every cluster of a license as the server last heard it: last seen, instances, GPUs,
        the last lease granted (and whether it still holds), version, development flag,
        whether it stopped cleanly, how far its reports cover its heartbeats."""
        row = self.store.get_license(license_id) if LICENSE_ID.match(license_id) else None
        if row is None:
            raise Refusal(f"no license {license_id[:64]}", "not_found", 404)
        lic = self.stored_license(row)
        now = self.now()
        silent = self.silent_after_s(lic)
        out = []
        for c in self.store.clusters_of(license_id):
            last = c["last_heartbeat_at"]
            out.append({
                "cluster_id": c["cluster_id"], "activated_at": c["activated_at"],
                "last_heartbeat_at": last, "instances": c["instances"], "gpus": c["gpus"],
                "version": c["version"], "development": c["development"],
                "stopped": c["stopped"], "lease_id": c["lease_id"],
                "lease_expires_at": c["lease_expires_at"],
                "lease_valid": c["lease_expires_at"] is not None and c["lease_expires_at"] > now,
                "silent": (last is not None and not c["stopped"] and now - last > silent),
                "unreported_since": c["unreported_since"], "covered_until": c["covered_until"],
                "last_report_at": c["last_report_at"],
                "quarantined_reports": c["quarantined_reports"],
                "quarantined_seconds": c["quarantined_seconds"]})
        return {"license_id": license_id, "clusters": out}

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
            lic = self.stored_license(lic_row)
            # The window check reaches back before the first day asked for.
            wfirst = max(first - (p.window_days - 1), 0)
            facts = LicenseFacts(
                license_id=lid, max_instances=lic.max_instances, max_gpus=lic.max_gpus,
                active=lic_row["revoked_at"] is None and now < lic.expires_at,
                silent_after_s=self.silent_after_s(lic), clusters=self.store.clusters_of(lid),
                days=self.store.observed_days(lid, day_name(first), day_name(last)),
                hours=self.store.observed_hours(lid, wfirst * 24, (last + 1) * 24 - 1),
                cluster_days=self.store.cluster_days(lid, day_name(first), day_name(last)))
            got, warn = license_usage(
                facts, self.store.intervals(lid, wfirst * DAY, (last + 1) * DAY),
                first_day=first, last_day=last, now=now,
                active_now=self.store.active_instances(lid, fresh_s=self.slow_after_s(lic)),
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
