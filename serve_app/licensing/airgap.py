"""An air-gapped installation's side of licensing by file (``license_contract.airgap``).

The installation key is made once, on the head node, next to the ledger (``installation_key.pem``,
0600); its public half goes to the vendor in the activation request, and every lease the vendor
grants this installation names it. The ledger's usage log holds what the vendor has not billed
yet: a bundle carries every entry after the one the latest imported lease acknowledges, signed
with the installation key. Only ids, times, durations and instance and GPU counts leave the
cluster; never a prompt or an output.

Pure file and SQLite work, no network: the CLI (``cli.py``) and the license actor use it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from license_contract import (
    GENESIS,
    ActivationRequest,
    Lease,
    LeaseError,
    License,
    UsageBundle,
    bundle_text,
    canonical,
    file_text,
    iso,
    public_key_text,
    read_lease,
    request_text,
    signed_in_file,
    verify_lease,
)
from serve_app.licensing.ledger import UsageLedger
from serve_app.licensing.usage_log import split_by_day

KEY_FILE = "installation_key.pem"
IMPORTED_META = "airgap_lease:"  # + license id: the latest lease imported by file
ACK_META = "airgap_ack:"  # + license id: the last entry the vendor acknowledged
DAY = 86400.0


class AirGapError(Exception):
    """A step of licensing by file that cannot be done; the message says what to do."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def key_path(ledger_path: str | Path) -> Path:
    return Path(ledger_path).expanduser().parent / KEY_FILE


def installation_key(ledger_path: str | Path, *, create: bool = False) -> Ed25519PrivateKey | None:
    """The installation's private key; made (0600) when ``create`` and there is none yet."""
    path = key_path(ledger_path)
    if not path.exists():
        if not create:
            return None
        key = Ed25519PrivateKey.generate()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        return key
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise AirGapError(f"{path} is not an Ed25519 private key", "installation_key_invalid")
    return key


def installation_public(ledger_path: str | Path) -> str | None:
    key = installation_key(ledger_path)
    return None if key is None else public_key_text(key.public_key())


def activation_request(lic: License, license_key: str, ledger: UsageLedger, ledger_path: str,
                       *, models: tuple[str, ...], instances: int, gpus: float,
                       now: float) -> str:
    """``request.json``: the license, this installation's new public key (its private half
    stays in the data dir), what the cluster will run, and the log's head, signed with the
    installation key. The license key itself is not carried, only its SHA-256."""
    if not lic.air_gapped:
        raise AirGapError(f"License {lic.license_id} is not an air-gapped license: the app "
                          "activates it with the license server itself.", "license_not_air_gapped")
    key = installation_key(ledger_path, create=True)
    assert key is not None
    request = ActivationRequest(
        license_id=lic.license_id, key_sha256=hashlib.sha256(license_key.encode()).hexdigest(),
        installation_id=ledger.cluster_id(), models=models, instances=instances,
        gpus=float(gpus), log_head=ledger.log_head(), created_at=float(now),
        signer=public_key_text(key.public_key()))
    return file_text("request", request_text(request, key.sign(canonical(request))),
                     license_id=lic.license_id, installation_id=request.installation_id,
                     models=list(models), instances=instances, gpus=float(gpus),
                     created_at=iso(now),
                     note="For the vendor: python -m license_server activate request.json")


def import_lease(lic: License, ledger: UsageLedger, ledger_path: str, text: str, *,
                 now: float) -> Lease:
    """Keep a lease (``lease.json`` or a renewal) the vendor granted this installation: signed
    by the license's signer, for this license, installation and key, unexpired, and not older
    than the one already imported. The running actor takes it at its next tick."""
    public = installation_public(ledger_path)
    if public is None:
        raise AirGapError(f"No installation key in {key_path(ledger_path).parent}: run "
                          "`python -m serve_app license request` first.", "installation_key_missing")
    try:
        lease = verify_lease(signed_in_file(text, "lease"), signer=lic.signer,
                             license_id=lic.license_id, cluster_id=ledger.cluster_id(), now=now,
                             installation_key=public)
    except LeaseError as exc:
        raise AirGapError(f"{exc} ({exc.code})", exc.code) from None
    current = imported_lease(ledger, lic)
    if current is not None and lease.issued_at < current.issued_at:
        raise AirGapError(f"This lease was issued at {iso(lease.issued_at)}, before the one "
                          f"imported already ({iso(current.issued_at)}).", "lease_older")
    ledger.set_meta(IMPORTED_META + lic.license_id, signed_in_file(text, "lease"))
    if lease.acknowledged_head is not None:
        ledger.set_meta(ACK_META + lic.license_id, lease.acknowledged_head)
    return lease


def imported_lease(ledger: UsageLedger, lic: License) -> Lease | None:
    """The latest imported lease, read whatever its expiry (its signature still checked)."""
    text = ledger.get_meta(IMPORTED_META + lic.license_id)
    if text is None:
        return None
    try:
        return read_lease(text, signer=lic.signer)
    except LeaseError:
        return None


def imported_lease_text(ledger: UsageLedger, lic: License) -> str | None:
    return ledger.get_meta(IMPORTED_META + lic.license_id)


def acknowledged(ledger: UsageLedger, lic: License) -> str:
    return ledger.get_meta(ACK_META + lic.license_id) or GENESIS


def waiting(ledger: UsageLedger, lic: License, now: float) -> dict[str, float | int | None]:
    """What is waiting to be carried: entries since the acknowledged one, and for how long
    (days since the oldest of them)."""
    rows = ledger.log_after(acknowledged(ledger, lic)) or []
    if not rows:
        return {"entries": 0, "days": 0.0, "since": None}
    since = float(json.loads(rows[0][1]).get("at", now))
    return {"entries": len(rows), "days": round(max(0.0, now - since) / DAY, 2), "since": since}


def export_bundle(lic: License, ledger: UsageLedger, ledger_path: str, *, now: float) -> str:
    """``bundle.json``: every usage-log entry after the acknowledged one, in order, chaining
    from it, signed with the installation key."""
    key = installation_key(ledger_path)
    if key is None:
        raise AirGapError("No installation key: this installation was never activated "
                          "(`python -m serve_app license request`).", "installation_key_missing")
    previous = acknowledged(ledger, lic)
    rows = ledger.log_after(previous)
    if rows is None:
        raise AirGapError(f"The usage log holds no entry {previous}, the last one the vendor "
                          "acknowledged: the log was replaced or cut.", "log_head_missing")
    entries = tuple(text for _, text, _ in rows)
    bundle = UsageBundle(license_id=lic.license_id, installation_id=ledger.cluster_id(),
                         previous_head=previous, entries=entries,
                         head=rows[-1][2] if rows else previous, exported_at=float(now),
                         signer=public_key_text(key.public_key()))
    days: dict[str, float] = {}
    kinds: dict[str, int] = {}
    for text in entries:
        entry = json.loads(text)
        kinds[entry["kind"]] = kinds.get(entry["kind"], 0) + 1
        for day, seconds in split_by_day(entry.get("intervals", [])).items():
            days[day] = round(days.get(day, 0.0) + seconds["instance_seconds"], 3)
    return file_text("bundle", bundle_text(bundle, key.sign(canonical(bundle))),
                     license_id=lic.license_id, installation_id=bundle.installation_id,
                     entries=kinds, instance_seconds_per_day=days,
                     previous_head=previous, head=bundle.head, exported_at=iso(now),
                     contains="ids, times, durations, instance and GPU counts: no prompt or "
                              "output", note="For the vendor: python -m license_server "
                                             "import-usage bundle.json")
