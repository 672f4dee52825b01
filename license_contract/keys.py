"""License keys: what a key entitles, and how either side reads one.

A key is a signed document (``signed.py``) with the prefix ``MTL1``: self-describing (the app
reads entitlements from it offline) and checked against the key that signed it, which it names.
The vendor signs (``license_server``). The app trusts the vendor keys its build pins; a key
signed by any other key is a *development* license, which the vendor's server refuses.
"""

from __future__ import annotations

import time
from collections.abc import Collection

from pydantic import BaseModel, Field

from license_contract.signed import (
    SIGNED,
    SignatureError,
    canonical,
    iso,
    open_signed,
    signed_text,
)

PREFIX = "MTL1"
HELP = "Check that the whole key was copied, or ask the vendor for a new one."
# Ids are opaque tokens: printable ASCII, no spaces (a NUL would be a 500 from PostgreSQL).
ID = r"^[!-~]+$"


class LicenseError(Exception):
    """A key that cannot be used; the message says what is wrong and what to do."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class License(BaseModel):
    """What a key entitles: signed by the vendor, read by the customer's app."""

    model_config = SIGNED

    license_id: str = Field(min_length=1, max_length=64, pattern=ID,
                            description="Stable id; reports and billing use it.")
    customer: str = Field(min_length=1, max_length=256)
    models: tuple[str, ...] = Field(min_length=1, description="Entitled model names; '*' is any.")
    issued_at: float
    expires_at: float
    max_instances: int | None = Field(None, ge=1, description="Concurrent LLM replicas allowed.")
    max_gpus: float | None = Field(None, gt=0, description="GPUs in use at once allowed.")
    heartbeat_interval_s: float = Field(gt=0)
    grace_period_s: float = Field(ge=0, description="Serving time without check-in.")
    server_url: str = Field(min_length=1, description="The vendor's license server.")
    signer: str = Field(description="The public key that signed this license (base64url).")

    def allows_model(self, name: str) -> bool:
        return "*" in self.models or name in self.models


def key_text(lic: License, signature: bytes) -> str:
    """A key from the license and the signature of its canonical bytes."""
    return signed_text(PREFIX, canonical(lic), signature)


def verify_key(key: str, *, signers: Collection[str] | None = None, now: float | None = None,
               check_expiry: bool = True) -> License:
    """Check spelling and signature and (unless told not to) expiry; return the license or raise
    ``LicenseError``. ``signers``: the only keys trusted to sign (the license server passes its
    own); None trusts the key the license names, as the app does before it tells the vendor's
    pinned keys from development ones. The license server reads expired keys too: their usage
    is still billed."""
    try:
        lic = open_signed(key, PREFIX, License, what="license key",
                          signers=None if signers is None else frozenset(signers))
    except SignatureError as exc:
        code = {"license key_invalid_signature": "license_invalid_signature",
                "license key_untrusted_signer": "license_untrusted_signer"}.get(
                    exc.code, "license_malformed")
        raise LicenseError(f"{exc} {HELP}", code) from None
    now = time.time() if now is None else now
    if check_expiry and now >= lic.expires_at:
        raise LicenseError(
            f"License {lic.license_id} expired at {iso(lic.expires_at)}. Renew it with the vendor.",
            "license_expired",
        )
    return lic
