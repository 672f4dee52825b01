"""The downloader's source-independent logic, the manifest format and the config fields, with
an in-memory source standing in for presigned URLs (ranged GETs only, no transfer manager)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator

import pytest

from license_contract import (
    Manifest,
    ManifestEntry,
    ManifestError,
    build_manifest,
    parse_manifest,
)
from serve_app.cli import print_manifest
from serve_app.config import ModelConfig, Settings
from serve_app.weights.cache import CacheError
from serve_app.weights.fetch import (
    UNREACHABLE,
    Progress,
    Tuning,
    WeightsError,
    fetch_model,
    fetch_or_verified_copy,
    missing_ranges,
    read_ranges,
    split_range,
)
from serve_app.weights.s3 import make_s3_client

TUNING = Tuning(part_bytes=1000, concurrency=3, attempts=2, record_every=100,
                progress_every_s=0.0)


class Cut(ConnectionError):
    pass


class MemorySource:
    """Files in memory, served by ranges; ``cut_at`` cuts each listed stream once at a byte."""

    retryable = (Cut,)

    def __init__(self, files: dict[str, bytes], block: int = 64) -> None:
        self.files, self.block = files, block
        self.requests: list[tuple[str, int, int]] = []
        self.cut_at: set[int] = set()
        self._lock = threading.Lock()

    def describe(self, name: str) -> str:
        return f"memory://{name}"

    def read_range(self, name: str, start: int, end: int) -> Iterator[bytes]:
        with self._lock:
            self.requests.append((name, start, end))
        data = self.files[name]
        for pos in range(start, end, self.block):
            with self._lock:
                cut = next((c for c in self.cut_at if pos <= c < pos + self.block), None)
                self.cut_at.discard(cut)
            if cut is not None:
                yield data[pos:cut]
                raise Cut(f"cut at {cut}")
            yield data[pos:min(pos + self.block, end)]


def manifest_of(files: dict[str, bytes]) -> Manifest:
    return Manifest(tuple(ManifestEntry(n, len(d), hashlib.sha256(d).hexdigest())
                          for n, d in files.items()))


FILES = {"config.json": b"{}", "sub/model.bin": bytes(range(256)) * 20, "empty.txt": b""}


def test_a_manifest_source_without_the_transfer_manager(tmp_path):
    source = MemorySource(FILES)
    folder = fetch_model(manifest_of(FILES), source, tmp_path / "m", tuning=TUNING)
    for name, data in FILES.items():
        assert (folder / name).read_bytes() == data
    assert sorted(r for r in source.requests if r[0] == "sub/model.bin") == [
        ("sub/model.bin", s, e) for s, e in split_range(0, 5120, 1000)]
    assert not [r for r in source.requests if r[0] == "empty.txt"]


def test_a_cut_stream_resumes_at_the_byte_it_reached(tmp_path):
    source = MemorySource(FILES)
    source.cut_at = {2500}
    fetch_model(manifest_of(FILES), source, tmp_path / "m", tuning=TUNING)
    assert ("sub/model.bin", 2500, 3000) in source.requests
    assert (tmp_path / "m" / "sub/model.bin").read_bytes() == FILES["sub/model.bin"]


def test_a_stream_cut_every_time_fails_and_says_to_run_again(tmp_path):
    source = MemorySource(FILES)
    source.cut_at = {2500, 2600}  # two attempts, two cuts
    with pytest.raises(WeightsError, match="memory://sub/model.bin.*Run again to resume"):
        fetch_model(manifest_of(FILES), source, tmp_path / "m", tuning=TUNING)
    ranges = read_ranges(tmp_path / "m" / "sub/model.bin.partial.ranges", 5120)
    assert (2000, 2600) in ranges or any(s <= 2000 and e >= 2600 for s, e in ranges)
    source.requests.clear()
    fetch_model(manifest_of(FILES), source, tmp_path / "m", tuning=TUNING)
    fetched = [(s, e) for n, s, e in source.requests if n == "sub/model.bin"]
    assert all(not (s < 2600 and e > 2000) for s, e in fetched)


def test_a_complete_folder_is_not_read_again_and_a_new_manifest_refreshes_it(tmp_path):
    source = MemorySource(FILES)
    folder = fetch_model(manifest_of(FILES), source, tmp_path / "m", tuning=TUNING)
    source.requests.clear()
    fetch_model(manifest_of(FILES), source, folder, tuning=TUNING)
    assert source.requests == []
    newer = {"config.json": b'{"v": 2}', "sub/model.bin": FILES["sub/model.bin"]}
    source.files = newer
    fetch_model(manifest_of(newer), source, folder, tuning=TUNING)
    assert [r[0] for r in source.requests] == ["config.json"]  # the unchanged file is kept
    assert (folder / "config.json").read_bytes() == b'{"v": 2}'
    assert not (folder / "empty.txt").exists()  # not in the new manifest


def test_a_file_changed_on_disk_is_fetched_again(tmp_path):
    source = MemorySource(FILES)
    folder = fetch_model(manifest_of(FILES), source, tmp_path / "m", tuning=TUNING)
    (folder / "sub/model.bin").write_bytes(b"truncated")
    source.requests.clear()
    fetch_model(manifest_of(FILES), source, folder, tuning=TUNING)
    assert {r[0] for r in source.requests} == {"sub/model.bin"}


def test_only_an_unreachable_source_falls_back_to_the_verified_copy(tmp_path, caplog):
    """The fallback S3 and licensed: sources share: reaching the source (its manifest or grant)
    may fail over to the copy verified before; nothing else may."""
    source = MemorySource(FILES)
    folder = tmp_path / "m"

    def fetch(manifest):
        return fetch_model(manifest, source, folder, tuning=TUNING)

    def unreachable():
        raise WeightsError("Cannot reach memory://.", code=UNREACHABLE)

    def refused():
        raise WeightsError("The manifest is not there.")

    with pytest.raises(WeightsError, match="Cannot reach"):  # nothing verified yet
        fetch_or_verified_copy(folder, unreachable, fetch)
    assert fetch_or_verified_copy(folder, lambda: manifest_of(FILES), fetch) == folder
    with caplog.at_level(logging.WARNING, logger="serve_app.weights"):
        assert fetch_or_verified_copy(folder, unreachable, fetch) == folder
    assert "Cannot reach memory://. Serving the copy verified earlier in" in caplog.text
    with pytest.raises(WeightsError, match="not there"):
        fetch_or_verified_copy(folder, refused, fetch)
    source.files = newer = {**FILES, "config.json": b'{"v": 2}'}
    source.cut_at = {0, 1}  # the new version's download fails: no fallback to the old copy
    with pytest.raises(WeightsError, match="Run again to resume"):
        fetch_or_verified_copy(folder, lambda: manifest_of(newer), fetch)


def test_progress_is_logged_with_a_rate(caplog):
    clock = iter([0.0, 2.0, 4.0, 4.0]).__next__
    with caplog.at_level(logging.INFO, logger="serve_app.weights"):
        progress = Progress(4 * 1048576, "s3://b/p/", Tuning(progress_every_s=1.0), clock)
        progress.add(1048576)
        progress.add(1048576)
        progress.finish()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "Fetching s3://b/p/: 1.0 of 4.0 MiB (25%), 0.5 MiB/s"
    assert lines[-1] == "Fetching s3://b/p/: 2.0 of 4.0 MiB (50%), 0.5 MiB/s"


def test_ranges_merge_and_their_complement():
    assert missing_ranges([(0, 10), (20, 30)], 40) == [(10, 20), (30, 40)]
    assert missing_ranges([], 5) == [(0, 5)]
    assert missing_ranges([(0, 5)], 5) == []
    assert split_range(10, 35, 10) == [(10, 20), (20, 30), (30, 35)]


def test_a_torn_ranges_record_is_read_up_to_the_torn_line(tmp_path):
    path = tmp_path / "x.partial.ranges"
    path.write_text("0 10\n10 25\n40 50\n45 60\n70 7")  # a process killed mid-line
    assert read_ranges(path, 55) == [(0, 25), (40, 55)]


def test_manifest_round_trip_and_cli(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "sub" / "w.bin").write_bytes(b"abc")
    (tmp_path / ".hidden").write_text("x")
    manifest = build_manifest(tmp_path)
    assert [f.name for f in manifest.files] == ["config.json", "sub/w.bin"]
    assert parse_manifest(manifest.to_json()) == manifest
    assert print_manifest([str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["version"] == 1
    assert doc["files"][1] == {"name": "sub/w.bin", "size": 3,
                               "sha256": hashlib.sha256(b"abc").hexdigest()}


@pytest.mark.parametrize("files, error", [
    ([{"name": "../etc/passwd", "size": 1, "sha256": "a" * 64}], "unsafe file name"),
    ([{"name": "/abs", "size": 1, "sha256": "a" * 64}], "unsafe file name"),
    ([{"name": "a//b", "size": 1, "sha256": "a" * 64}], "unsafe file name"),
    ([{"name": "x", "size": -1, "sha256": "a" * 64}], "an integer from 0"),
    ([{"name": "x", "size": 1, "sha256": "A" * 64}], "64 lowercase hex"),
    ([{"name": "x", "size": 1}], "name, size and sha256"),
    ([{"name": "x", "size": 1, "sha256": "a" * 64}] * 2, "listed twice"),
    ([], "non-empty"),
])
def test_a_manifest_that_cannot_be_trusted_is_refused(files, error):
    with pytest.raises(ManifestError, match=error):
        parse_manifest(json.dumps({"version": 1, "files": files}))


def test_the_bucket_settings_come_from_the_environment_and_stay_secret(monkeypatch):
    monkeypatch.setenv("SERVE_APP_MODEL", "s3://weights/smollm2")
    monkeypatch.setenv("SERVE_APP_S3_ENDPOINT_URL", "https://storage.googleapis.com")
    monkeypatch.setenv("SERVE_APP_S3_REGION", "auto")
    monkeypatch.setenv("SERVE_APP_S3_ACCESS_KEY_ID", "GOOG1EXAMPLE")
    monkeypatch.setenv("SERVE_APP_S3_SECRET_ACCESS_KEY", "very-secret")
    model = Settings().to_app_config().models[0]
    assert model.name == "smollm2"
    options = model.s3_options()
    assert (options.endpoint_url, options.region, options.secret_access_key) == (
        "https://storage.googleapis.com", "auto", "very-secret")
    assert "very-secret" not in repr(model) and "very-secret" not in repr(options)
    assert "GOOG1EXAMPLE" not in repr(options)
    # Left unset, the endpoint is boto3's to find (AWS_ENDPOINT_URL, else AWS S3).
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert make_s3_client(ModelConfig().s3_options()).meta.endpoint_url == "http://127.0.0.1:9"


# -- the cache is not a write primitive: links planted in it are refused, never followed -------

PRECIOUS = b"not the app's to write"


@pytest.mark.parametrize("planted", [
    "sub/model.bin", "sub/model.bin.partial", "sub/model.bin.partial.ranges", ".complete",
    "sub", "../.m.lock",
])
def test_a_link_planted_in_the_cache_is_refused_and_not_written_through(tmp_path, planted):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "file"
    target.write_bytes(PRECIOUS)
    folder = tmp_path / "cache" / "m"
    (folder / "sub").mkdir(parents=True)
    link = folder / planted
    if planted == "sub":
        link.rmdir()
    link.symlink_to(outside if planted == "sub" else target)
    source = MemorySource(FILES)
    with pytest.raises(CacheError, match="symbolic link"):
        fetch_model(manifest_of(FILES), source, folder, tuning=TUNING)
    assert target.read_bytes() == PRECIOUS and sorted(outside.iterdir()) == [target]
    assert link.is_symlink()  # refused, not quietly removed: the operator sees what was there
    assert source.requests == []  # refused before anything was fetched


def test_a_model_folder_that_is_a_link_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "cache" / "s3").mkdir(parents=True)
    (tmp_path / "cache" / "s3" / "m").symlink_to(outside)
    with pytest.raises(CacheError, match="symbolic link"):
        fetch_model(manifest_of(FILES), MemorySource(FILES), tmp_path / "cache" / "s3" / "m",
                    within=tmp_path / "cache", tuning=TUNING)
    assert list(outside.iterdir()) == []
    # The configured cache itself may be a link (to a larger disk): it is resolved once.
    disk = tmp_path / "disk"
    disk.mkdir()
    (tmp_path / "linked-cache").symlink_to(disk)
    folder = fetch_model(manifest_of(FILES), MemorySource(FILES),
                         tmp_path / "linked-cache" / "s3" / "m", within=tmp_path / "linked-cache",
                         tuning=TUNING)
    assert (disk / "s3" / "m" / "sub" / "model.bin").read_bytes() == FILES["sub/model.bin"]
    assert folder == tmp_path / "linked-cache" / "s3" / "m"


@pytest.mark.parametrize("name", ["../escape.bin", "/tmp/escape.bin", "sub/../../escape.bin"])
def test_a_manifest_name_escaping_the_folder_is_refused(tmp_path, name):
    # The manifest parser refuses these names; the cache refuses them too, whoever built the
    # manifest.
    files = {"config.json": b"{}", name: b"x" * 10}
    source = MemorySource(files)
    with pytest.raises(CacheError, match="not a file name inside"):
        fetch_model(manifest_of(files), source, tmp_path / "cache" / "m", tuning=TUNING)
    assert sorted(p.name for p in tmp_path.rglob("*escape*")) == []
    assert not any(n == name for n, _, _ in source.requests)


def test_a_file_is_replaced_not_written_through_and_unlisted_files_go(tmp_path):
    """What the cache does with what it finds: a stale file is removed, a mismatching one
    fetched again into a fresh .partial; neither through its old inode (a hard link to a file
    outside keeps its bytes)."""
    outside = tmp_path / "outside.bin"
    outside.write_bytes(PRECIOUS)
    folder = tmp_path / "cache" / "m"
    (folder / "sub").mkdir(parents=True)
    os.link(outside, folder / "sub" / "model.bin")
    (folder / "stale.bin").write_bytes(b"old shard")
    folder = fetch_model(manifest_of(FILES), MemorySource(FILES), folder, tuning=TUNING)
    assert (folder / "sub" / "model.bin").read_bytes() == FILES["sub/model.bin"]
    assert outside.read_bytes() == PRECIOUS
    assert not (folder / "stale.bin").exists()
