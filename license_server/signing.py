"""The vendor's signing key: made, stored and used only by the license server.

Customers never hold this code: their app checks keys, leases and model identities against the
vendor's public keys its build pins (``license_contract``), and what it cannot sign it cannot
forge.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from license_contract import (
    Lease,
    License,
    ModelIdentity,
    canonical,
    identity_text,
    key_text,
    lease_text,
    public_key_text,
)


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


def signer_of(private_key: Ed25519PrivateKey) -> str:
    """The ``signer`` every document signed with ``private_key`` names."""
    return public_key_text(private_key.public_key())


def sign_license(lic: License, private_key: Ed25519PrivateKey) -> str:
    """The key for ``lic``, which must name this key as its signer."""
    if lic.signer != signer_of(private_key):
        raise ValueError("the license names another signer")
    return key_text(lic, private_key.sign(canonical(lic)))


def sign_lease(lease: Lease, private_key: Ed25519PrivateKey) -> str:
    if lease.signer != signer_of(private_key):
        raise ValueError("the lease names another signer")
    return lease_text(lease, private_key.sign(canonical(lease)))


def sign_identity(identity: ModelIdentity, private_key: Ed25519PrivateKey) -> str:
    if identity.signer != signer_of(private_key):
        raise ValueError("the model identity names another signer")
    return identity_text(identity, private_key.sign(canonical(identity)))
