"""Licensing with no network path to the vendor: what is carried by hand, in both directions.

An air-gapped installation never dials the license server. Instead:

1. ``ActivationRequest`` (customer → vendor): the license, a new installation key (its private
   half stays on the head), what the cluster will run; signed with the installation key, which
   proves the request comes from the holder of that key.
2. The vendor answers with a lease (``lease.py``) that names the installation key.
3. ``UsageBundle`` (customer → vendor): every usage-log entry since the last one the vendor
   acknowledged, in order, each naming the hash of the one before (the hash-chained log), signed
   with the installation key. The vendor checks the signature and the chain (nothing missing,
   reordered or altered, nothing skipped since the last bundle), bills the entries it has not
   billed yet, and answers with a renewal lease that acknowledges the bundle's head.

Entries carry ids, times, durations and instance and GPU counts, never a prompt or an output.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from license_contract.keys import ID
from license_contract.signed import SIGNED, SignatureError, canonical, open_signed, signed_text
from license_contract.usage import STRICT, IntervalModel

ACTIVATION_PREFIX = "MTLA1"
BUNDLE_PREFIX = "MTLB1"
GENESIS = "0" * 64  # the ``prev`` of a log's first entry
HASH = r"^[0-9a-f]{64}$"
MAX_BUNDLE_ENTRIES = 200_000


class ActivationRequest(BaseModel):
    model_config = SIGNED

    license_id: str = Field(min_length=1, max_length=64, pattern=ID)
    key_sha256: str = Field(pattern=HASH, description="SHA-256 of the license key: proves the "
                            "requester holds it without carrying the key itself.")
    installation_id: str = Field(min_length=1, max_length=128, pattern=ID,
                                 description="The installation's id; its cluster id.")
    models: tuple[str, ...] = Field(min_length=1, max_length=256)
    instances: int = Field(ge=1, le=1_000_000)
    gpus: float = Field(ge=0, le=1_000_000)
    created_at: float
    signer: str = Field(description="The installation's public key.")


class UsageEntry(BaseModel):
    """One entry of the customer's hash-chained usage log, as it is hashed and carried.

    ``report``: sealed usage intervals; ``beat``: what ran at ``at`` (written every report
    interval while the app runs); ``start``/``stop``: the app started, or stopped cleanly (time
    between a ``stop`` and the next ``start`` is not unaccounted)."""

    model_config = STRICT

    kind: Literal["report", "beat", "start", "stop"]
    at: float
    license_id: str = Field(min_length=1, max_length=64, pattern=ID)
    cluster_id: str = Field(min_length=1, max_length=128, pattern=ID)
    report_id: str | None = Field(None, min_length=8, max_length=64, pattern=ID)
    intervals: list[IntervalModel] = Field(default_factory=list, max_length=100_000)
    instances: int | None = Field(None, ge=0, le=1_000_000)
    gpus: float | None = Field(None, ge=0, le=1_000_000)
    prev: str = Field(pattern=HASH)


class UsageBundle(BaseModel):
    model_config = SIGNED

    license_id: str = Field(min_length=1, max_length=64, pattern=ID)
    installation_id: str = Field(min_length=1, max_length=128, pattern=ID)
    previous_head: str = Field(pattern=HASH, description="The last entry the vendor acknowledged "
                               "(GENESIS before the first bundle): the first entry's prev.")
    entries: tuple[str, ...] = Field(max_length=MAX_BUNDLE_ENTRIES,
                                     description="Each entry's canonical JSON, as it was hashed.")
    head: str = Field(pattern=HASH, description="The hash of the last entry.")
    exported_at: float
    signer: str = Field(description="The installation's public key.")


class BundleError(Exception):
    """A bundle or request the vendor cannot take; ``code`` says why, the message where."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def entry_text(entry: UsageEntry) -> str:
    return json.dumps(entry.model_dump(mode="json", exclude_none=True), sort_keys=True,
                      separators=(",", ":"), allow_nan=False)


def entry_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def request_text(request: ActivationRequest, signature: bytes) -> str:
    return signed_text(ACTIVATION_PREFIX, canonical(request), signature)


def bundle_text(bundle: UsageBundle, signature: bytes) -> str:
    return signed_text(BUNDLE_PREFIX, canonical(bundle), signature)


def open_request(text: str) -> ActivationRequest:
    """The request, its signature checked against the installation key it names."""
    try:
        return open_signed(text, ACTIVATION_PREFIX, ActivationRequest,
                           what="activation request")
    except SignatureError as exc:
        raise BundleError(str(exc), exc.code.replace(" ", "_")) from None


def open_bundle(text: str, *, installation_key: str) -> tuple[UsageBundle, list[UsageEntry]]:
    """The bundle and its parsed entries, if ``installation_key`` signed it and its chain holds
    from ``previous_head`` to ``head``; else ``BundleError`` saying where it breaks."""
    try:
        bundle = open_signed(text, BUNDLE_PREFIX, UsageBundle, what="usage bundle",
                             signers=frozenset({installation_key}))
    except SignatureError as exc:
        code = "bundle_other_installation" if exc.code.endswith("untrusted_signer") else \
            exc.code.replace(" ", "_")
        raise BundleError(str(exc), code) from None
    entries, prev = [], bundle.previous_head
    for n, text_n in enumerate(bundle.entries):
        try:
            entry = UsageEntry.model_validate_json(text_n)
        except ValidationError as exc:
            raise BundleError(f"entry {n} is not a usage entry ({exc.errors()[0]['msg']})",
                              "bundle_entry_invalid") from None
        if entry.prev != prev:
            raise BundleError(f"entry {n} does not follow the one before it: an entry was "
                              "removed, inserted, reordered or altered", "bundle_chain_broken")
        if entry_text(entry) != text_n:
            raise BundleError(f"entry {n} is not in its canonical form", "bundle_entry_invalid")
        entries.append(entry)
        prev = entry_hash(text_n)
    if prev != bundle.head:
        raise BundleError("the bundle's head is not the hash of its last entry: its tail was "
                          "cut or altered", "bundle_chain_broken")
    return bundle, entries
