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

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
_READ_BLOCK = 1 << 20
# A published model's name: one key component in the vendor's bucket, one folder in a cache.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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
    entries = []
    for item in files:
        if not isinstance(item, dict) or set(item) != {"name", "size", "sha256"}:
            raise ManifestError(f"{origin}: each file needs exactly name, size and sha256: {item!r}")
        name, size, sha = item["name"], item["size"], item["sha256"]
        if not isinstance(name, str) or not _is_safe_name(name):
            raise ManifestError(f"{origin}: unsafe file name {name!r} (relative paths only)")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"{origin}: size of {name} must be a non-negative integer")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise ManifestError(f"{origin}: sha256 of {name} must be 64 lowercase hex digits")
        entries.append(ManifestEntry(name, size, sha))
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ManifestError(f"{origin}: a file is listed twice")
    return Manifest(tuple(entries))


def _is_safe_name(name: str) -> bool:
    # The name becomes a path under the cache folder; nothing may land outside it.
    path = PurePosixPath(name)
    return (bool(name) and not path.is_absolute() and "\\" not in name
            and all(part not in ("", ".", "..") for part in name.split("/"))
            and name != MANIFEST_NAME)


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

