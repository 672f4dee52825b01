"""The manifest of a model's files: name, size and sha256 of each, published next to them.

A bucket source holds ``manifest.json`` in its prefix::

    {"version": 1,
     "files": [{"name": "config.json", "size": 712, "sha256": "9f86d0..."},
               {"name": "model.safetensors", "size": 269060552, "sha256": "2c26b4..."}]}

Names are paths relative to the prefix (``/``-separated, no ``..``); every file vLLM needs is
listed, the manifest itself is not. ``build_manifest`` makes one from a local folder, for
publishing (``python -m serve_app manifest FOLDER``, the vendor's ``publish-model``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, Field

from license_contract.signed import SIGNED, SignatureError, canonical, open_signed, signed_text

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
_READ_BLOCK = 1 << 20
# A published model's name: one key component in the vendor's bucket, one folder in a cache.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Far above any real checkpoint, and bounded so that a manifest cannot ask a node to reserve
# absurd space or hold absurd bookkeeping.
MAX_FILES = 10_000
MAX_FILE_BYTES = 1 << 40
MAX_NAME_CHARS = 1024
MAX_PART_CHARS = 255
# What a cache folder keeps beside the files while it fetches (``serve_app.weights.fetch``).
_RESERVED_SUFFIXES = (".partial", ".partial.ranges")


class ManifestError(ValueError):
    """A manifest that cannot be trusted to describe a model's files."""


@dataclass(frozen=True)
class ManifestEntry:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    files: tuple[ManifestEntry, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        files = [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in self.files]
        return json.dumps({"version": MANIFEST_VERSION, "files": files}, indent=1) + "\n"


def parse_manifest(data: bytes | str, origin: str = MANIFEST_NAME) -> Manifest:
    """Parse and validate a manifest; ``origin`` names it in error messages."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ManifestError(f"{origin} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != MANIFEST_VERSION:
        raise ManifestError(f"{origin}: expected an object with \"version\": {MANIFEST_VERSION}")
    files = doc.get("files")
    if not isinstance(files, list) or not files:
        raise ManifestError(f"{origin}: \"files\" must be a non-empty list")
    if len(files) > MAX_FILES:
        raise ManifestError(f"{origin}: {len(files)} files, more than {MAX_FILES}")
    entries = []
    for item in files:
        if not isinstance(item, dict) or set(item) != {"name", "size", "sha256"}:
            raise ManifestError(f"{origin}: each file needs exactly name, size and sha256: {item!r}")
        name, size, sha = item["name"], item["size"], item["sha256"]
        if not isinstance(name, str) or not _is_safe_name(name):
            shown = repr(name)[:80]
            raise ManifestError(f"{origin}: unsafe file name {shown} (relative paths of printable "
                                "characters only, no hidden or reserved names)")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE_BYTES:
            raise ManifestError(f"{origin}: size of {name} must be an integer from 0 to "
                                f"{MAX_FILE_BYTES}")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise ManifestError(f"{origin}: sha256 of {name} must be 64 lowercase hex digits")
        entries.append(ManifestEntry(name, size, sha))
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ManifestError(f"{origin}: a file is listed twice")
    return Manifest(tuple(entries))


def _is_safe_name(name: str) -> bool:
    # The name becomes a path under the cache folder: nothing may land outside it, on the
    # cache's own bookkeeping (hidden stamps, .partial files) or through an odd character.
    parts = name.split("/")
    return (0 < len(name) <= MAX_NAME_CHARS and name.isprintable()
            and not PurePosixPath(name).is_absolute() and "\\" not in name
            and all(part and len(part) <= MAX_PART_CHARS and not part.startswith(".")
                    for part in parts)
            and not name.endswith(_RESERVED_SUFFIXES) and name != MANIFEST_NAME)


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def build_manifest(folder: str | os.PathLike[str]) -> Manifest:
    """The manifest of every file under ``folder`` (hidden files and a manifest excluded)."""
    root = Path(folder)
    entries = []
    for path in sorted(_files(root)):
        name = path.relative_to(root).as_posix()
        entries.append(ManifestEntry(name, path.stat().st_size, sha256_file(path)))
    if not entries:
        raise ManifestError(f"{root} holds no files")
    return Manifest(tuple(entries))


def _files(root: Path) -> Iterable[Path]:
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and not any(p.startswith(".") for p in rel.parts) \
                and rel.as_posix() != MANIFEST_NAME:
            yield path



# -- the vendor's word on a published model ---------------------------------------------------

IDENTITY_PREFIX = "MTLM1"


class ModelIdentity(BaseModel):
    """What the license server signs when it hands out a model: which model these files are.
    The replica checks every file against ``manifest`` and registers under ``model``; the
    license must cover that name, whatever the customer calls the model."""

    model_config = SIGNED

    model: str = Field(pattern=MODEL_NAME.pattern)
    manifest: dict[str, Any]
    signer: str

    def files(self) -> Manifest:
        return parse_manifest(json.dumps(self.manifest), f"the signed manifest of {self.model}")


def identity_text(identity: ModelIdentity, signature: bytes) -> str:
    return signed_text(IDENTITY_PREFIX, canonical(identity), signature)


def verify_identity(text: str, *, signers: frozenset[str]) -> tuple[ModelIdentity, Manifest]:
    """The signed identity and its parsed manifest; ``ManifestError`` unless one of ``signers``
    signed it and the manifest is valid."""
    try:
        identity = open_signed(text, IDENTITY_PREFIX, ModelIdentity, what="model identity",
                               signers=signers)
        return identity, identity.files()
    except SignatureError as exc:
        raise ManifestError(str(exc)) from None
