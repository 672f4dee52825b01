"""License keys: what a key says, how it is spelled, and how its signature is checked.

A key is ``MTL1.<payload>.<signature>``: base64url of the license's canonical JSON, and of its
Ed25519 signature made with the vendor's private key. It is self-describing (the app reads
entitlements from it offline) and verifiable with the vendor public key alone. The vendor signs
(``license_server``); both sides verify here, so that they read a key the same way.
"""

from __future__ import annotations

import base64
import binascii
import json
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
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


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def canonical(lic: License) -> bytes:
    """The bytes the vendor signs: the license as sorted, compact JSON."""
    return json.dumps(lic.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


def key_text(payload: bytes, signature: bytes) -> str:
    """A key from the signed payload and its signature."""
    return f"{PREFIX}.{b64(payload)}.{b64(signature)}"


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
        payload, signature = unb64(parts[1]), unb64(parts[2])
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
            f"License {lic.license_id} expired at {iso(lic.expires_at)}. Renew it with the vendor.",
            "license_expired",
        )
    return lic


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def public_key_text(key: Ed25519PublicKey) -> str:
    """The public key as customers configure it: base64url of the 32 raw bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return b64(raw)


def load_public_key(text: str) -> Ed25519PublicKey:
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("not Ed25519")
            return key
        return Ed25519PublicKey.from_public_bytes(unb64(text))
    except (ValueError, binascii.Error) as exc:
        raise LicenseError(f"The vendor public key is not a valid Ed25519 key ({exc}).",
                           "license_public_key_invalid") from None
