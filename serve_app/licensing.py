"""License keys and licensing policy. Pure: no I/O, the clock is an argument.

A key is ``MTL1.<payload>.<signature>``: base64url of the license's canonical JSON, and of its
Ed25519 signature made with the vendor's private key. It is self-describing (the app reads
entitlements from it offline) and verifiable with the vendor public key alone.

Policy (``decide``): a valid, unexpired, unrevoked license serves while the last successful
check-in with the license server is younger than the grace period; after that new requests get
503 ``license_checkin_overdue``. Revoked and expired licenses get 403. Requests already running
are never touched: the decision is consulted only when a request arrives.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PREFIX = "MTL1"
HELP = "Check that the whole key was copied, or ask the vendor for a new one."


class LicenseError(Exception):
    """A key that cannot be used; the message says what is wrong and what to do."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class License(BaseModel):
    """What a key entitles: signed by the vendor, read by the customer's app."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    license_id: str = Field(min_length=1, description="Stable id; reports and billing use it.")
    customer: str = Field(min_length=1)
    models: tuple[str, ...] = Field(("*",), description="Entitled model names; '*' is any.")
    issued_at: float
    expires_at: float
    max_instances: int | None = Field(None, ge=1, description="Concurrent LLM replicas allowed.")
    heartbeat_interval_s: float = Field(30.0, gt=0)
    grace_period_s: float = Field(72 * 3600.0, ge=0, description="Serving time without check-in.")
    server_url: str = Field(description="The vendor's license server.")

    def allows_model(self, name: str) -> bool:
        return "*" in self.models or name in self.models


# -- keys -------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def canonical(lic: License) -> bytes:
    return json.dumps(lic.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


def sign_license(lic: License, private_key: Ed25519PrivateKey) -> str:
    payload = canonical(lic)
    return f"{PREFIX}.{_b64(payload)}.{_b64(private_key.sign(payload))}"


def verify_key(
    key: str, public_key: Ed25519PublicKey, *, now: float | None = None, check_expiry: bool = True
) -> License:
    """Check format, signature and (unless told not to) expiry; return the license or raise
    ``LicenseError``. The license server reads expired keys too: their usage is still billed."""
    key = key.strip()
    parts = key.split(".")
    if len(parts) == 2 and parts[0] == PREFIX:
        raise LicenseError(f"The license key is truncated (no signature). {HELP}",
                           "license_malformed")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise LicenseError(
            f"This is not a license key (expected '{PREFIX}.<payload>.<signature>'). {HELP}",
            "license_malformed",
        )
    try:
        payload, signature = _unb64(parts[1]), _unb64(parts[2])
    except (binascii.Error, ValueError):
        raise LicenseError(f"The license key is garbled (bad encoding). {HELP}",
                           "license_malformed") from None
    if len(signature) != 64:
        raise LicenseError(f"The license key is truncated (short signature). {HELP}",
                           "license_malformed")
    try:
        public_key.verify(signature, payload)
    except InvalidSignature:
        raise LicenseError(
            "The license key's signature does not match the vendor public key: the key was "
            "altered or truncated, or it was issued for another vendor key. Use the key exactly "
            "as received, and the public key that came with it.",
            "license_invalid_signature",
        ) from None
    try:
        lic = License.model_validate_json(payload)
    except ValidationError as exc:
        raise LicenseError(f"The license key's contents are invalid ({exc.errors()[0]['msg']}). "
                           f"{HELP}", "license_malformed") from None
    now = time.time() if now is None else now
    if check_expiry and now >= lic.expires_at:
        raise LicenseError(
            f"License {lic.license_id} expired at {_iso(lic.expires_at)}. Renew it with the vendor.",
            "license_expired",
        )
    return lic


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def new_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the vendor signing key must be Ed25519")
    return key


def public_key_text(key: Ed25519PublicKey) -> str:
    """The public key as customers configure it: base64url of the 32 raw bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _b64(raw)


def load_public_key(text: str) -> Ed25519PublicKey:
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("not Ed25519")
            return key
        return Ed25519PublicKey.from_public_bytes(_unb64(text))
    except (ValueError, binascii.Error) as exc:
        raise LicenseError(f"The vendor public key is not a valid Ed25519 key ({exc}).",
                           "license_public_key_invalid") from None


# -- policy -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    allowed: bool
    status: int  # HTTP status for refused requests
    code: str
    message: str
    grace_left_s: float


def decide(
    lic: License | None,
    *,
    now: float,
    last_checkin: float | None,
    revoked: bool = False,
    invalid_reason: str | None = None,
    started_at: float | None = None,
) -> Decision:
    """Whether new requests may be served.

    Grace counts from the last successful check-in; before the first one, from ``started_at``
    (so a cluster that boots while the license server is down still serves for the grace
    period).
    """
    if lic is None:
        return Decision(False, 403, "license_invalid", invalid_reason or "No valid license.", 0.0)
    if revoked:
        return Decision(False, 403, "license_revoked",
                        f"License {lic.license_id} was revoked by the vendor.", 0.0)
    if now >= lic.expires_at:
        return Decision(False, 403, "license_expired",
                        f"License {lic.license_id} expired at {_iso(lic.expires_at)}.", 0.0)
    anchor = last_checkin if last_checkin is not None else started_at
    if anchor is None:
        anchor = now
    grace_left = anchor + lic.grace_period_s - now
    if grace_left <= 0:
        return Decision(
            False, 503, "license_checkin_overdue",
            f"The license server has not been reached since {_iso(anchor)}, longer than the "
            f"grace period of {lic.grace_period_s / 3600:g} h. Restore connectivity to "
            f"{lic.server_url}; serving resumes at the next successful check-in.", 0.0,
        )
    return Decision(True, 200, "ok", "ok", grace_left)
