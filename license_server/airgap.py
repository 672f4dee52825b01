"""The vendor's desk for air-gapped installations: activation requests and usage bundles that a
customer carries by hand (``license_contract.airgap``), answered with leases carried back.

- ``activate``: an activation request, signed by the new installation's key, for an active
  air-gapped license whose key the requester holds (its SHA-256 matches), for models the license
  covers. Answered with a lease naming the installation key; asked again, with the same lease.
- ``import_usage``: a bundle signed by that key, whose chain starts at the last entry billed.
  Its report entries are billed like online reports (the same tables, idempotent by report id),
  its beat, start and stop entries are observed like heartbeats at the times they were logged
  (the same cross-checks: witnessed seconds, caps, slow gaps, coverage). Answered with a
  renewal lease that acknowledges the bundle's head. A replayed bundle bills and observes
  nothing and gets the answer already given.

Refusals (``Refusal``, with the contract's codes): ``bundle_other_installation`` (signed by
another key, or holding another installation's entries), ``bundle_chain_broken`` (an entry
removed, reordered or altered, or not chaining on from the last acknowledged entry),
``bundle_entry_invalid``, ``installation_unknown``. A report entry that cannot be true is set
aside, not billed, and flagged; the rest of its bundle is billed.
"""

from __future__ import annotations

import hmac
import json
import math
from typing import TYPE_CHECKING, Any

from license_contract import (
    SKEW_S,
    BundleError,
    Lease,
    License,
    UsageBundle,
    UsageEntry,
    entry_hash,
    file_text,
    iso,
    open_bundle,
    open_request,
    read_bundle,
    read_lease,
    signed_in_file,
)
from license_server.billing import Beat, Interval, Refusal
from license_server.db import HeartbeatRules, ReportRules
from license_server.signing import sign_lease

if TYPE_CHECKING:
    from license_server.service import LicenseService


def _refusal(exc: BundleError, status: int = 400) -> Refusal:
    if exc.code == "bundle_other_installation":
        status = 403
    return Refusal(str(exc), exc.code, status)


class AirGapDesk:
    def __init__(self, service: LicenseService) -> None:
        self.service = service

    # -- activation ------------------------------------------------------------------------------

    def activate(self, text: str) -> str:
        """``lease.json`` for an activation request (``request.json``)."""
        svc = self.service
        try:
            req = open_request(signed_in_file(text, "request"))
        except BundleError as exc:
            raise _refusal(exc) from None
        lic, row = self._license(req.license_id)
        if not hmac.compare_digest(row["key_sha256"], req.key_sha256):
            raise Refusal("the request does not come from a holder of this license's key",
                          "license_key_mismatch", 403)
        status = self._status(lic, row)
        if status != "active":
            raise Refusal(f"license {lic.license_id} is {status}: no activation",
                          f"license_{status}", 403)
        refused = [m for m in req.models if not lic.allows_model(m)]
        if refused:
            raise Refusal(f"license {lic.license_id} does not cover {', '.join(refused)} (it "
                          f"covers: {', '.join(lic.models)})", "model_not_licensed", 403)
        known = svc.store.installation(lic.license_id, req.installation_id)
        if known is not None:
            if known["installation_key"] != req.signer:
                raise Refusal(f"installation {req.installation_id} is activated already, with "
                              "another key", "installation_exists", 409)
            return self._lease_file(known["lease_text"], lic, req.installation_id)
        svc.activate(lic, status, req.installation_id)  # the cluster cap
        lease = self._lease(lic, req.installation_id, req.signer, req.log_head)
        signed = sign_lease(lease, svc.signing_key)
        svc.store.add_installation(
            license_id=lic.license_id, installation_id=req.installation_id, key=req.signer,
            models=json.dumps(list(req.models)), instances=req.instances, gpus=req.gpus,
            head=req.log_head, lease_id=lease.lease_id, lease_text=signed,
            lease_expires_at=lease.expires_at)
        return self._lease_file(signed, lic, req.installation_id)

    # -- usage bundles ---------------------------------------------------------------------------

    def import_usage(self, text: str) -> str:
        """``renewal.json`` for a usage bundle (``bundle.json``), once it is billed."""
        svc = self.service
        try:
            signed = signed_in_file(text, "bundle")
            claimed = read_bundle(signed)
        except BundleError as exc:
            raise _refusal(exc) from None
        lic, row = self._license(claimed.license_id)
        inst = svc.store.installation(lic.license_id, claimed.installation_id)
        if inst is None:
            raise Refusal(f"installation {claimed.installation_id} of license "
                          f"{lic.license_id} was never activated", "installation_unknown", 404)
        try:
            bundle, entries = open_bundle(signed, installation_key=inst["installation_key"])
        except BundleError as exc:
            raise _refusal(exc) from None
        for n, e in enumerate(entries):
            if e.license_id != lic.license_id or e.cluster_id != inst["installation_id"]:
                raise Refusal(f"entry {n} belongs to license {e.license_id}, installation "
                              f"{e.cluster_id}", "bundle_other_installation", 403)
        new = self._new_entries(bundle, entries, inst)
        if new is None:  # a replay: nothing after the acknowledged head
            return self._lease_file(inst["lease_text"], lic, inst["installation_id"])
        refused = self._record(lic, inst["installation_id"], new)
        lease = self._lease(lic, inst["installation_id"], inst["installation_key"], bundle.head)
        signed_lease = sign_lease(lease, svc.signing_key)
        moved = svc.store.acknowledge(
            lic.license_id, inst["installation_id"], previous=inst["acknowledged_head"],
            head=bundle.head, last_entry_at=new[-1].at if new else None,
            lease_id=lease.lease_id, lease_text=signed_lease, lease_expires_at=lease.expires_at)
        if not moved:
            raise Refusal("another bundle of this installation was imported meanwhile; import "
                          "this one again", "bundle_conflict", 409)
        status = self._status(lic, row)
        if status != "active":
            raise Refusal(f"usage billed; license {lic.license_id} is {status}, so no renewal",
                          f"license_{status}", 403)
        return self._lease_file(signed_lease, lic, inst["installation_id"], refused=refused)

    def _new_entries(self, bundle: UsageBundle, entries: list[UsageEntry],
                     inst: dict[str, Any]) -> list[UsageEntry] | None:
        """The entries after the acknowledged head; None for a bundle that brings none (a
        replay). A bundle may start at an earlier acknowledged head (an export repeated before
        the renewal was imported) as long as it passes through the acknowledged one."""
        ack = inst["acknowledged_head"]
        hashes = [bundle.previous_head, *(entry_hash(t) for t in bundle.entries)]
        if bundle.previous_head != ack:
            known = self.service.store.known_heads(inst["license_id"], inst["installation_id"])
            if bundle.previous_head not in known:
                raise Refusal(f"the bundle starts after entry {bundle.previous_head[:16]}, which "
                              f"this installation never had acknowledged (the last acknowledged "
                              f"is {ack[:16]}): a bundle in between is missing, or the log was "
                              "rewritten", "bundle_chain_broken")
            if ack not in hashes:
                if bundle.head in known:
                    return None
                raise Refusal(f"the bundle's entries fork from the acknowledged log (entry "
                              f"{ack[:16]} is not among them): entries were altered or "
                              "removed", "bundle_chain_broken")
        start = hashes.index(ack)
        new = entries[start:]
        return new if new or bundle.previous_head == ack else None

    def _record(self, lic: License, installation_id: str,
                entries: list[UsageEntry]) -> list[dict[str, Any]]:
        """Bill report entries and observe the others, in the order they were logged. A report
        that cannot be true (as online: in the server's future, overlapping usage billed) is
        set aside unbilled, counted as refused for the cluster (the ``quarantined_reports``
        alert) and listed in the answer: the rest of the bundle is billed, and the
        installation is not locked out by one entry."""
        refused: list[dict[str, Any]] = []
        svc = self.service
        beat_rules = HeartbeatRules(slow_after_s=svc.slow_after_s(lic),
                                    cover_tolerance_s=svc.cover_tolerance_s(lic))
        # Logged over days or weeks and carried later: intervals are held to the license's
        # issue (not to an activation the app may have run before) and to the server's now.
        report_rules = ReportRules(issued_at=lic.issued_at, grace_period_s=math.inf,
                                   skew_s=SKEW_S, max_interval_s=86400.0,
                                   overlap_tolerance_s=0.001,
                                   cover_tolerance_s=svc.cover_tolerance_s(lic))
        for e in entries:
            if e.kind == "report":
                assert e.report_id is not None or not e.intervals
                if e.report_id is None:
                    continue
                try:
                    svc.store.add_report(
                        report_id=e.report_id, license_id=lic.license_id,
                        cluster_id=installation_id,
                        items=[Interval(i.instance_id, i.start, i.end, i.gpus)
                               for i in e.intervals], rules=report_rules)
                except Refusal as exc:
                    refused.append({"report_id": e.report_id, "code": exc.code,
                                    "reason": str(exc), "seconds": round(sum(
                                        i.end - i.start for i in e.intervals), 3)})
            elif e.at <= svc.now() + SKEW_S:  # a beat from the server's future shows nothing
                running = e.kind == "beat"
                svc.store.observe_beat(lic.license_id, installation_id, Beat(
                    e.at, (e.instances or 0) if running else 0,
                    (e.gpus or 0.0) if running else 0.0, e.kind == "stop"), beat_rules)
        if refused:
            svc.store.count_refused(lic.license_id, installation_id, len(refused),
                                    sum(r["seconds"] for r in refused))
        return refused

    # -- the admin's view ------------------------------------------------------------------------

    def installations(self, license_id: str) -> dict[str, Any]:
        """Every air-gapped installation of a license: key, activation, last bundle, the head
        billed, the lease last answered, and whether it is overdue (that lease has run out and
        no bundle renewed it)."""
        now = self.service.now()
        out = []
        for i in self.service.store.installations_of(license_id):
            out.append({
                "installation_id": i["installation_id"], "installation_key": i["installation_key"],
                "activated_at": i["activated_at"], "models": json.loads(i["models"]),
                "instances": i["instances"], "gpus": i["gpus"], "bundles": i["bundles"],
                "last_bundle_at": i["last_bundle_at"], "last_entry_at": i["last_entry_at"],
                "acknowledged_head": i["acknowledged_head"],
                "lease_expires_at": i["lease_expires_at"],
                "overdue": now >= i["lease_expires_at"],
                "overdue_s": max(0.0, now - i["lease_expires_at"])})
        return {"license_id": license_id, "installations": out}

    # -- helpers ---------------------------------------------------------------------------------

    def _license(self, license_id: str) -> tuple[License, dict[str, Any]]:
        svc = self.service
        row = svc.store.get_license(license_id)
        if row is None:
            raise Refusal(f"no license {license_id}", "license_unknown", 404)
        lic = svc.stored_license(row)
        if lic.signer != svc.public_key:
            raise Refusal(f"license {license_id} was signed by another key", "license_unknown",
                          404)
        if not lic.air_gapped:
            raise Refusal(f"license {license_id} is not air-gapped: its app checks in with this "
                          "server", "license_not_air_gapped")
        return lic, row

    def _status(self, lic: License, row: dict[str, Any]) -> str:
        if self.service.now() >= lic.expires_at:
            return "expired"
        return "revoked" if row["revoked_at"] is not None else "active"

    def _lease(self, lic: License, installation_id: str, key: str, head: str) -> Lease:
        lease = self.service.lease(lic, installation_id, development=False)
        return lease.model_copy(update={"installation_key": key, "acknowledged_head": head})

    @staticmethod
    def _lease_file(signed: str, lic: License, installation_id: str,
                    refused: list[dict[str, Any]] | None = None) -> str:
        lease = read_lease(signed)
        extra: dict[str, Any] = {"refused_reports": refused} if refused else {}
        return file_text("lease", signed, license_id=lic.license_id,
                         installation_id=installation_id, expires_at=iso(lease.expires_at),
                         instances=lease.instances, gpus=lease.gpus,
                         acknowledged_head=lease.acknowledged_head, **extra,
                         note="For the customer: python -m serve_app license import <this file>")
