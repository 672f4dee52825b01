"""Fetch a model's files into a local folder: parallel ranged GETs, resume, verify, one per node.

``fetch_model(manifest, source, folder)`` is the whole logic; a *source* is the only part that
touches the network:

- ``S3Source`` (``serve_app.weights.s3``): a bucket prefix through boto3, with the bucket's
  credentials. A fresh file goes through boto3's transfer manager (parallel ranged GETs); the
  missing ranges of a partial one through ranged ``GetObject`` calls.
- any object with the same two methods, e.g. presigned HTTPS URLs fetched with ranged GETs.

Layout of ``folder`` while and after fetching::

    <name>                  a verified file (renamed into place only when complete and verified)
    <name>.partial          bytes being fetched, each written at its offset
    <name>.partial.ranges   the byte ranges of the .partial already written ("start end" lines),
                            so that a later run fetches only the rest
    .complete               the manifest whose files were all verified
    ../.<folder>.lock       held while fetching: one download per node, however many replicas

Every file is reached through ``cache.CacheFolder``: opened relative to the folder, with
``O_NOFOLLOW``, so that a link planted at any of these names, or a linked subfolder, is refused
instead of written through. A file whose sha256 differs from the manifest is removed and fetched
once more; a second mismatch fails with the file's name. ``fetch_or_verified_copy`` is how the
bucket and licensed sources call it: when the manifest cannot be had because the source is
unreachable, the copy verified before is served.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO, TypeVar

from license_contract import Manifest, ManifestEntry, ManifestError, parse_manifest
from serve_app.errors import ConfigError
from serve_app.weights.cache import CacheFolder

logger = logging.getLogger(__name__)

MiB = 1 << 20
_STAMP = ".complete"
T = TypeVar("T")


class WeightsError(ConfigError):
    """Model weights could not be fetched or verified; the message says what to do."""

    code = "weights_error"


UNREACHABLE = "weights_source_unreachable"  # the code of a WeightsError for a network failure


@dataclass(frozen=True)
class Tuning:
    """How files are split and fetched. 64 MiB parts, 16 at a time, as boto3's transfer
    manager is given: large enough that request overhead does not count, enough parallel
    streams to fill a link that one TCP stream cannot."""

    part_bytes: int = 64 * MiB
    concurrency: int = 16
    attempts: int = 5
    # Written ranges are recorded at least this often per stream: what a killed process loses.
    record_every: int = 8 * MiB
    progress_every_s: float = 5.0


class Source(Protocol):
    """Where a manifest's files come from."""

    def describe(self, name: str) -> str:
        """Where ``name`` comes from, for messages (no secrets)."""

    def read_range(self, name: str, start: int, end: int) -> Iterator[bytes]:
        """The bytes ``[start, end)`` of ``name``; a cut connection raises ``retryable``."""

    retryable: tuple[type[BaseException], ...]


class WholeFileSource(Source, Protocol):
    def download(self, name: str, size: int, out: RangeWriter) -> None:
        """Fetch all of ``name`` into ``out`` (at its offsets), e.g. with a transfer manager."""


class RangeWriter:
    """Writes bytes at their offsets into a .partial file and records which ranges are there.

    Writes that continue one another are merged into one run; a run is recorded every
    ``record_every`` bytes and when the writer closes, after its bytes were written.
    """

    def __init__(self, fd: int, record: TextIO, progress: Progress, record_every: int) -> None:
        self._fd, self._record = fd, record
        self._runs: dict[int, int] = {}  # where a run of writes ends -> recorded up to
        self._lock = threading.Lock()
        self._progress = progress
        self._record_every = record_every

    @classmethod
    def create(cls, folder: CacheFolder, partial: str, size: int, progress: Progress,
               record_every: int) -> RangeWriter:
        """A writer into ``partial`` (``size`` bytes) of ``folder``, and its ranges record."""
        fd = folder.open_file(partial, os.O_RDWR | os.O_CREAT)
        try:
            os.ftruncate(fd, size)
            record = folder.open_file(_ranges_name(partial),
                                      os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, os.fdopen(record, "a"), progress, record_every)

    def write(self, offset: int, data: bytes) -> None:
        os.pwrite(self._fd, data, offset)
        end = offset + len(data)
        with self._lock:
            recorded = self._runs.pop(offset, offset)
            if end - recorded >= self._record_every:
                recorded = self._flush(recorded, end)
            self._runs[end] = recorded
        self._progress.add(len(data))

    def _flush(self, start: int, end: int) -> int:
        self._record.write(f"{start} {end}\n")
        self._record.flush()
        return end

    def close(self) -> None:
        with self._lock:
            for end, recorded in self._runs.items():
                if end > recorded:
                    self._flush(recorded, end)
            self._runs.clear()
        self._record.close()
        os.close(self._fd)


def fetch_model(manifest: Manifest, source: Source, folder: Path, *,
                within: Path | None = None, tuning: Tuning = Tuning(),
                now: Callable[[], float] = time.monotonic) -> Path:
    """Make ``folder`` hold exactly the manifest's files, verified; return it.

    ``within`` is where the cache lives (default: the folder's parent): it is resolved once,
    and nothing from there down is reached through a link (``cache.CacheFolder``). Safe when
    several processes of one node call it at once: one fetches, the others wait on the lock
    and find the folder complete.
    """
    with CacheFolder.open(folder, within=within) as cache:
        if _is_complete(cache, manifest):
            return folder
        with cache.locked():
            if _is_complete(cache, manifest):  # another replica finished while we waited
                return folder
            cache.unlink(_STAMP)
            _remove_unlisted(cache, manifest)
            logger.info("Fetching %d files (%.1f MiB) from %s into %s", len(manifest.files),
                        manifest.total_bytes / MiB, source.describe(""), folder)
            progress = Progress(manifest.total_bytes, source.describe(""), tuning, now)
            for entry in manifest.files:
                _ensure_file(entry, source, cache, tuning, progress)
            progress.finish()
            cache.write_text(_STAMP, manifest.to_json())
    return folder


def verified_manifest(cache: CacheFolder) -> Manifest | None:
    """The manifest of the complete, verified copy in ``cache``, if there is one."""
    text = cache.read_text(_STAMP)
    if text is None:
        return None
    try:
        manifest = parse_manifest(text, str(cache.path / _STAMP))
    except ManifestError:
        return None
    return manifest if _is_complete(cache, manifest) else None


def fetch_or_verified_copy(folder: Path, reach: Callable[[], T], fetch: Callable[[T], Path], *,
                           within: Path | None = None) -> Path:
    """``fetch(reach())``; or, when ``reach`` (reading the manifest, asking for a grant) cannot
    reach the source and ``folder`` holds a copy verified before, that copy, with a warning: a
    replica restarting while the source is down still serves. Only reaching falls back: any
    other failure of ``reach`` (keys, bucket, manifest, a refused license) is a configuration
    to fix, and a failed download of a new version fails."""
    try:
        found = reach()
    except WeightsError as exc:
        if exc.code != UNREACHABLE:
            raise
        try:
            with CacheFolder.open(folder, within=within, create=False) as cache:
                verified = verified_manifest(cache)
        except FileNotFoundError:
            verified = None
        if verified is None:
            raise
        logger.warning("%s Serving the copy verified earlier in %s.", exc.message, folder)
        return folder
    return fetch(found)


def _is_complete(cache: CacheFolder, manifest: Manifest) -> bool:
    # Checksums were verified when the stamp was written; sizes catch a file removed since.
    if cache.read_text(_STAMP) != manifest.to_json():
        return False
    return all(cache.size(f.name) == f.size for f in manifest.files)


def _remove_unlisted(cache: CacheFolder, manifest: Manifest) -> None:
    # A shard left from an earlier version of the model would be loaded with the new ones.
    # Listing the folder also refuses any link planted in it, before anything is written.
    keep = {f.name for f in manifest.files}
    keep |= {f"{n}.partial" for n in keep} | {f"{n}.partial.ranges" for n in keep}
    for name in list(cache.names()):
        if not name.startswith(".") and name not in keep:
            logger.info("Removing %s: not in the model's manifest", cache.path / name)
            cache.unlink(name)


def _ensure_file(entry: ManifestEntry, source: Source, cache: CacheFolder, tuning: Tuning,
                 progress: Progress) -> None:
    name = entry.name
    if cache.size(name) == entry.size and cache.sha256(name) == entry.sha256:
        progress.add(entry.size)
        return
    cache.unlink(name)
    partial = f"{name}.partial"
    for attempt in (1, 2):
        _fetch_partial(entry, source, cache, partial, tuning, progress)
        actual = cache.sha256(partial)
        if actual == entry.sha256:
            cache.replace(partial, name)
            cache.unlink(_ranges_name(partial))
            return
        got = cache.size(partial)
        _remove_partial(cache, partial)
        progress.add(-entry.size)
        logger.warning("%s: sha256 %s, the manifest says %s (%d bytes, expected %d); removed%s",
                       source.describe(name), actual, entry.sha256, got, entry.size,
                       ", fetching it once more" if attempt == 1 else "")
    raise WeightsError(
        f"Checksum mismatch for {name}: {source.describe(name)} does not match its "
        "manifest, twice (the bad copies were removed). Republish the file and its manifest.json "
        "(python -m serve_app manifest FOLDER) or fix the manifest."
    )


def _fetch_partial(entry: ManifestEntry, source: Source, cache: CacheFolder, partial: str,
                   tuning: Tuning, progress: Progress) -> None:
    ranges = _ranges_name(partial)
    cache.lstat(ranges)  # a link there is refused, not removed
    if cache.size(partial) is None:
        cache.unlink(ranges)
    done = parse_ranges(cache.read_text(ranges) or "", entry.size)
    missing = missing_ranges(done, entry.size)
    have = entry.size - sum(end - start for start, end in missing)
    progress.add(have)
    if have:
        logger.info("Resuming %s: %d of %d bytes already here", entry.name, have, entry.size)
    writer = RangeWriter.create(cache, partial, entry.size, progress, tuning.record_every)
    try:
        if missing == [(0, entry.size)] and hasattr(source, "download"):
            source.download(entry.name, entry.size, writer)
        elif missing:
            parts = [p for start, end in missing for p in split_range(start, end, tuning.part_bytes)]
            with ThreadPoolExecutor(min(tuning.concurrency, len(parts))) as pool:
                for future in [pool.submit(_fetch_range, source, entry.name, start, end, writer,
                                           tuning.attempts) for start, end in parts]:
                    future.result()
    finally:
        writer.close()


def _fetch_range(source: Source, name: str, start: int, end: int, out: RangeWriter,
                 attempts: int) -> None:
    position = start
    for attempt in range(1, attempts + 1):
        try:
            for block in source.read_range(name, position, end):
                block = block[: end - position]
                out.write(position, block)
                position += len(block)
            if position == end:
                return
            logger.warning("%s: stream ended at byte %d of %d-%d (attempt %d of %d)",
                           name, position, start, end, attempt, attempts)
        except source.retryable as exc:
            logger.warning("%s: connection lost at byte %d of %d-%d (attempt %d of %d): %s",
                           name, position, start, end, attempt, attempts, exc)
    raise WeightsError(f"Could not fetch {source.describe(name)}: the connection failed "
                       f"{attempts} times. Run again to resume where it stopped.",
                       code=UNREACHABLE)


def _ranges_name(partial: str) -> str:
    return f"{partial}.ranges"


def _remove_partial(cache: CacheFolder, partial: str) -> None:
    cache.unlink(partial)
    cache.unlink(_ranges_name(partial))


def read_ranges(path: Path, size: int) -> list[tuple[int, int]]:
    """The merged ranges recorded in the file ``path`` (see ``parse_ranges``)."""
    with CacheFolder.open(path.parent, create=False) as cache:
        return parse_ranges(cache.read_text(path.name) or "", size)


def parse_ranges(text: str, size: int) -> list[tuple[int, int]]:
    """The merged ``[start, end)`` ranges of a ranges record; malformed lines are ignored
    (a process killed mid-line leaves one)."""
    ranges = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and all(f.isdigit() for f in fields):
            start, end = int(fields[0]), min(int(fields[1]), size)
            if start < end:
                ranges.append((start, end))
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def missing_ranges(done: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The complement of merged ``done`` ranges in ``[0, size)``."""
    missing, position = [], 0
    for start, end in done:
        if start > position:
            missing.append((position, start))
        position = max(position, end)
    if position < size:
        missing.append((position, size))
    return missing


def split_range(start: int, end: int, part: int) -> list[tuple[int, int]]:
    return [(s, min(s + part, end)) for s in range(start, end, part)]


class Progress:
    """Logs bytes fetched, at most every ``tuning.progress_every_s`` seconds, and at the end."""

    def __init__(self, total: int, label: str, tuning: Tuning, now: Callable[[], float]) -> None:
        self.total, self.done, self._label, self._now = total, 0, label, now
        self._every = tuning.progress_every_s
        self._start = self._last = now()
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            t = self._now()
            if t - self._last >= self._every:
                self._last = t
                self._log(t)

    def _log(self, t: float) -> None:
        rate = self.done / max(t - self._start, 1e-9) / MiB
        logger.info("Fetching %s: %.1f of %.1f MiB (%.0f%%), %.1f MiB/s", self._label,
                    self.done / MiB, self.total / MiB, 100 * self.done / max(self.total, 1), rate)

    def finish(self) -> None:
        self._log(self._now())
