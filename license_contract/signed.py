"""Signed documents: how keys, leases and model grants are spelled and checked.

A signed document is ``<PREFIX>.<payload>.<signature>``: base64url (no padding) of a model's
canonical JSON, and of its Ed25519 signature. Every document names its ``signer``, the signing
key's public half (base64url of its 32 raw bytes), so that a reader knows which key to check it
with and can tell the vendor's pinned keys from any other.

Strict, because money depends on it: base64 must be canonical (one spelling per document), a
public key must not be of small order (under such a key any payload "verifies"), and payloads
are parsed with no coercion and no non-finite numbers.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from typing import TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, ValidationError

# Parsed as the signer wrote it: no coercion ("30" is not 30), no NaN or infinity, no extras.
SIGNED = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

# The encodings of Ed25519's small-order points (libsodium's list), compared without the sign
# bit: the identity, the points of order 2, 4 and 8, and the non-canonical spellings of 0 and 1.
_SMALL_ORDER = {bytes.fromhex(h) for h in (
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
)}

M = TypeVar("M", bound=BaseModel)
SIGNATURE_CHARS = 86  # an Ed25519 signature's 64 bytes in base64url, unpadded


class SignatureError(Exception):
    """A document that cannot be trusted; ``code`` says why, the message what to do."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    """Decode base64url without padding, refusing every other spelling of the same bytes."""
    if not text.isascii():
        raise ValueError("not base64url")
    data = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    if b64(data) != text:
        raise ValueError("not the canonical base64url spelling")
    return data


def canonical(model: BaseModel) -> bytes:
    """The bytes a signer signs: the model as sorted, compact JSON."""
    return json.dumps(model.model_dump(mode="json"), sort_keys=True, separators=(",", ":"),
                      allow_nan=False).encode()


def signed_text(prefix: str, payload: bytes, signature: bytes) -> str:
    return f"{prefix}.{b64(payload)}.{b64(signature)}"


def public_key_text(key: Ed25519PublicKey) -> str:
    """A public key as documents name it: base64url of its 32 raw bytes."""
    return b64(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def load_public_key(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from base64url (or PEM); small-order keys are refused."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("not Ed25519")
            raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        else:
            raw = unb64(text)
            key = Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, binascii.Error) as exc:
        raise SignatureError(f"Not a valid Ed25519 public key ({exc}).",
                             "public_key_invalid") from None
    if bytes([*raw[:31], raw[31] & 0x7F]) in _SMALL_ORDER:
        raise SignatureError("The public key is of small order: it would accept any signature.",
                             "public_key_invalid")
    return key


def open_signed(text: str, prefix: str, model: type[M], *, what: str,
                signers: frozenset[str] | None = None) -> M:
    """Check a signed document's spelling and signature and parse its payload as ``model``
    (which has a ``signer`` field). ``signers``: the only keys accepted; None accepts any key
    the document names (its signature still has to match it)."""
    parts = text.strip().split(".")
    if len(parts) == 2 and parts[0] == prefix:
        raise SignatureError(f"The {what} is truncated (no signature).", f"{what}_malformed")
    if len(parts) != 3 or parts[0] != prefix:
        raise SignatureError(f"This is not a {what} (expected '{prefix}.<payload>.<signature>').",
                             f"{what}_malformed")
    if len(parts[2]) < SIGNATURE_CHARS:
        raise SignatureError(f"The {what} is truncated (short signature).", f"{what}_malformed")
    try:
        payload, signature = unb64(parts[1]), unb64(parts[2])
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"The {what} is garbled ({exc}).", f"{what}_malformed") from None
    if len(signature) != 64:
        raise SignatureError(f"The {what} is garbled (a signature is 64 bytes).",
                             f"{what}_malformed")
    try:
        signer = json.loads(payload)["signer"]
        if not isinstance(signer, str):
            raise TypeError("signer is not a string")
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"The {what} names no signer ({exc}).", f"{what}_malformed") from None
    if signers is not None and signer not in signers:
        raise SignatureError(f"The {what} is signed by a key this side does not trust.",
                             f"{what}_untrusted_signer")
    try:
        load_public_key(signer).verify(signature, payload)
    except SignatureError as exc:
        raise SignatureError(f"The {what}'s signer is unusable: {exc}", f"{what}_malformed") from None
    except InvalidSignature:
        raise SignatureError(f"The {what}'s signature does not match its contents: it was "
                             "altered or truncated.", f"{what}_invalid_signature") from None
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SignatureError(f"The {what}'s contents are invalid ({where}: {first['msg']}).",
                             f"{what}_malformed") from None


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
