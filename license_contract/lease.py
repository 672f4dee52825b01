"""Leases: the license server's signed permission for one cluster to serve until a time.

Every successful check-in returns one (``MTLL1.<payload>.<signature>``, signed by the key that
signed the license). Replicas serve new requests only under an unexpired lease, so that a
killed license actor, a deleted ledger or a clock set back stop serving once the lease runs out,
while an honest outage of the vendor's server keeps serving for the license's grace period (the
lease's lifetime). Times are the server's.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from license_contract.keys import ID
from license_contract.signed import SIGNED, SignatureError, canonical, open_signed, signed_text
from license_contract.usage import SKEW_S

LEASE_PREFIX = "MTLL1"


class Lease(BaseModel):
    model_config = SIGNED

    lease_id: str = Field(min_length=8, max_length=64, pattern=ID)
    license_id: str = Field(min_length=1, max_length=64, pattern=ID)
    cluster_id: str = Field(min_length=1, max_length=128, pattern=ID)
    instances: int | None = Field(ge=0, description="LLM replicas granted at once; None: no cap.")
    gpus: float | None = Field(ge=0, description="GPUs granted at once; None: no cap.")
    issued_at: float
    expires_at: float
    development: bool = Field(description="Granted to a development license.")
    signer: str


class LeaseError(Exception):
    """A lease that does not let this cluster serve; ``code`` says why."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def lease_text(lease: Lease, signature: bytes) -> str:
    return signed_text(LEASE_PREFIX, canonical(lease), signature)


def verify_lease(text: str, *, signer: str, license_id: str, cluster_id: str,
                 now: float) -> Lease:
    """The lease in ``text`` if ``signer`` signed it for this license and cluster and it holds
    at ``now`` (server time); else ``LeaseError``. A lease issued more than the allowed clock
    skew after ``now`` is refused too: no server hands out leases from its future."""
    try:
        lease = open_signed(text, LEASE_PREFIX, Lease, what="lease", signers=frozenset({signer}))
    except SignatureError as exc:
        raise LeaseError(str(exc), exc.code) from None
    if lease.license_id != license_id:
        raise LeaseError(f"The lease is for license {lease.license_id}, not {license_id}.",
                         "lease_wrong_license")
    if lease.cluster_id != cluster_id:
        raise LeaseError(f"The lease is for cluster {lease.cluster_id}, not {cluster_id}.",
                         "lease_wrong_cluster")
    if not lease.issued_at < lease.expires_at:
        raise LeaseError("The lease ends before it starts.", "lease_malformed")
    if lease.issued_at > now + SKEW_S:
        raise LeaseError("The lease is dated in the future of the server's time.", "lease_future")
    if now >= lease.expires_at:
        raise LeaseError("The lease has expired.", "lease_expired")
    return lease
