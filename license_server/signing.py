"""The vendor's signing key: made, stored and used only by the license server.

Customers never hold this code: their app verifies keys and leases with the vendor's public key
(``license_contract``), and what it cannot sign it cannot forge.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from license_contract import License, canonical, key_text


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


def sign_license(lic: License, private_key: Ed25519PrivateKey) -> str:
    """The key for ``lic``: its canonical JSON and the vendor's signature of it."""
    payload = canonical(lic)
    return key_text(payload, private_key.sign(payload))
