"""The vendor's identity, as this build pins it: the public keys whose licenses are real.

The keys ship inside the package, one per file in ``vendor_keys/`` (``*.pub``, base64url of the
32 raw bytes, as ``python -m license_server public-key`` prints it); several files let the vendor
rotate its key. They are part of the build, not of the configuration: nothing at run time adds
one. A license signed by any other key is a *development* license: it serves, says so in
``status``, ``/license`` and every heartbeat, cannot serve the vendor's own models, and the
vendor's license server refuses it.
"""

from __future__ import annotations

import functools
from pathlib import Path

from license_contract import License, SignatureError, load_public_key, verify_key

KEYS_DIR = Path(__file__).with_name("vendor_keys")


@functools.cache
def pinned_signers() -> frozenset[str]:
    """The vendor keys this build trusts (each checked to be a usable Ed25519 key)."""
    signers = set()
    for path in sorted(KEYS_DIR.glob("*.pub")):
        text = path.read_text().strip()
        try:
            load_public_key(text)
        except SignatureError as exc:
            raise RuntimeError(f"{path}: not a vendor public key ({exc})") from None
        signers.add(text)
    return frozenset(signers)


def is_development(lic: License) -> bool:
    return lic.signer not in pinned_signers()


def read_license(key: str, *, now: float | None = None,
                 check_expiry: bool = True) -> tuple[License, bool]:
    """The license in ``key`` (its signature checked against the key it names), and whether it
    is a development license; ``LicenseError`` for a key that cannot be used."""
    lic = verify_key(key, now=now, check_expiry=check_expiry)
    return lic, is_development(lic)
