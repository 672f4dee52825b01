"""A model's identity: the vendor's signed word on which model a folder's files are.

The license covers models by name, and a replica registers with the license actor under its
model's identity, whatever name clients use for it (``sources.claimed_identity``):

- ``licensed:<model>``: ``<model>``, known before anything is fetched (the license actor, and
  then the license server, refuse a license that does not cover it before any byte of the
  weights moves), and confirmed after the fetch by the identity the vendor's server signed
  (``license_contract.ModelIdentity``), kept in the cache folder beside the ``.complete`` stamp.
- a local folder that keeps such a signed identity (a copied cache folder): the model it names.
  The vendor's own models (signed by a key the build pins) need a license the vendor signed: a
  development license, or none, cannot serve them.
- anything else (``builtin:``, ``s3://``, a local folder keeping no identity): the served name,
  as configured.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from license_contract import LicenseError, ManifestError, ModelIdentity, verify_identity
from serve_app.errors import ConfigError
from serve_app.licensing import pinned_signers, read_license
from serve_app.weights.cache import CacheFolder
from serve_app.weights.fetch import WeightsError, verified_manifest

if TYPE_CHECKING:
    from serve_app.licensing import LicenseConfig

IDENTITY_STAMP = ".identity"


def store_identity(folder: Path, text: str, *, within: Path) -> None:
    """Keep the signed identity ``text`` in ``folder`` (beside its ``.complete`` stamp)."""
    with CacheFolder.open(folder, within=within) as cache:
        cache.write_text(IDENTITY_STAMP, text.strip() + "\n")


def read_identity(folder: Path, signers: frozenset[str], *, within: Path | None = None,
                  verified: bool = True) -> ModelIdentity | None:
    """The identity ``folder`` keeps, checked: signed by one of ``signers`` and, when
    ``verified``, naming exactly the files of the folder's verified copy. None when the folder
    keeps none; ``WeightsError`` for one that does not check."""
    try:
        with CacheFolder.open(folder, within=within, create=False) as cache:
            text = cache.read_text(IDENTITY_STAMP)
            files = verified_manifest(cache) if verified and text is not None else None
    except FileNotFoundError:
        return None
    if text is None:
        return None
    try:
        identity, manifest = verify_identity(text, signers=signers)
    except ManifestError as exc:
        raise WeightsError(f"{folder / IDENTITY_STAMP} is not a model identity this app can "
                           f"trust ({exc}). If these are not the vendor's weights, remove the "
                           "file.") from None
    if verified and manifest != files:
        raise WeightsError(f"{folder}: its verified files are not the ones the vendor signed as "
                           f"model {identity.model!r}. Fetch the model again.")
    return identity


def license_signer(license: LicenseConfig | None) -> tuple[str | None, bool]:
    """(the signer of the license, whether the build pins it); (None, False) without one."""
    if license is None:
        return None, False
    try:
        lic, development = read_license(license.key.get_secret_value(), check_expiry=False)
    except LicenseError as exc:
        raise ConfigError(str(exc), code=exc.code) from None
    return lic.signer, not development


def local_identity(folder: Path, served_name: str, license: LicenseConfig | None) -> str:
    """The identity of a local folder: the model its signed identity names, else
    ``served_name``."""
    try:
        with CacheFolder.open(folder, create=False) as cache:
            kept = cache.lstat(IDENTITY_STAMP) is not None
    except FileNotFoundError:
        kept = False
    if not kept:
        return served_name
    signer, vendor_issued = license_signer(license)
    pinned = pinned_signers()
    trusted = pinned | ({signer} if signer else set())
    # A copied folder is the vendor's word on which model these are, whatever files were
    # added or changed since: the files are not checked against it.
    identity = read_identity(folder, frozenset(trusted), verified=False)
    assert identity is not None
    if identity.signer in pinned and not vendor_issued:
        raise ConfigError(
            f"{folder} holds the vendor's model {identity.model!r}: it is served only under a "
            "license the vendor issued, and this app runs "
            + ("a development license." if license is not None else "no license."),
            code="model_not_licensed")
    return identity.model
