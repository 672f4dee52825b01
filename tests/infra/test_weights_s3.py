"""Model weights from a bucket: real boto3 against moto's S3 server on loopback."""
# ruff: noqa: F811 - fixtures imported from weights_fakes are parameters here

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from license_contract import Manifest, ManifestEntry
from serve_app.weights.cache import CacheError
from serve_app.weights.fetch import MiB, Tuning, WeightsError, read_ranges
from serve_app.weights.s3 import S3Options, fetch_s3_model, make_s3_client
from serve_app.weights.sources import resolve_model
from tests.infra.weights_fakes import (  # noqa: F401 - fixtures
    SMALL,
    aws_sandbox,
    moto_endpoint,
    new_bucket,
    options,
    proxy,
)

pytestmark = pytest.mark.usefixtures("aws_sandbox")

WEIGHTS = os.urandom(4 * MiB + 12345)  # five parts of 1 MiB, the last one short
CONFIG = b'{"architectures": ["LlamaForCausalLM"]}'
FILES = {"config.json": CONFIG, "model.safetensors": WEIGHTS}


def manifest_of(files: dict[str, bytes], **wrong_sha: str) -> bytes:
    return Manifest(tuple(
        ManifestEntry(name, len(data), wrong_sha.get(name.split(".")[0])
                      or hashlib.sha256(data).hexdigest())
        for name, data in files.items())).to_json().encode()


@pytest.fixture
def bucket(moto_endpoint):
    return new_bucket(moto_endpoint, FILES, manifest_of(FILES))


def fetch(endpoint, bucket, cache, tuning=SMALL):
    return fetch_s3_model(f"s3://{bucket}/model", cache, options(endpoint), tuning=tuning)


def assert_model(folder):
    assert (folder / "model.safetensors").read_bytes() == WEIGHTS
    assert (folder / "config.json").read_bytes() == CONFIG
    assert not list(folder.glob("*.partial*"))


def test_parallel_ranged_download_through_the_transfer_manager(proxy, bucket, tmp_path):
    # Hold every part after the first until three are in flight: a sequential download would
    # wait out the timeout and show one at a time.
    proxy.hold = lambda seen: seen.range_start not in (None, 0) and proxy.in_flight < 3
    folder = fetch(proxy.url, bucket, tmp_path)
    assert_model(folder)
    parts = proxy.gets("model/model.safetensors")
    assert sorted(p.range_start for p in parts) == [0, MiB, 2 * MiB, 3 * MiB, 4 * MiB]
    assert proxy.max_in_flight >= 3
    assert (folder / ".complete").is_file()


def test_a_cut_connection_refetches_only_the_cut_part(proxy, bucket, tmp_path):
    cut = []

    def cut_third_part_once(seen):
        if seen.range_start == 2 * MiB and not cut:
            cut.append(seen)
            return 300_000  # headers and part of the body
        return None

    proxy.cut = cut_third_part_once
    assert_model(fetch(proxy.url, bucket, tmp_path))
    assert cut
    starts = sorted(p.range_start for p in proxy.gets("model/model.safetensors"))
    assert starts == [0, MiB, 2 * MiB, 2 * MiB, 3 * MiB, 4 * MiB]


def test_a_run_cut_short_resumes_without_fetching_what_is_there(proxy, bucket, tmp_path):
    # Every part but the first is cut after ~300 kB, every time: the run fails...
    proxy.cut = lambda seen: 300_000 if seen.range_start not in (None, 0) else None
    with pytest.raises(WeightsError, match="Run again to resume"):
        fetch(proxy.url, bucket, tmp_path)
    (partial,) = tmp_path.glob("s3/*/model.safetensors.partial")
    kept = read_ranges(partial.with_name(partial.name + ".ranges"), len(WEIGHTS))
    # The first part arrived whole; how much of the cut ones was written before the transfer
    # manager gave up (and dropped its queued writes) varies.
    assert kept[0][0] == 0 and kept[0][1] >= MiB

    # ...and the next run fetches only the missing ranges, with ranged GETs.
    proxy.cut = lambda seen: None
    before = len(proxy.seen)
    assert_model(fetch(proxy.url, bucket, tmp_path))
    again = [s for s in proxy.seen[before:] if s.path.endswith("model.safetensors")]
    assert again and all(s.range for s in again)
    for seen in again:
        start, end = (int(x) for x in seen.range[6:].split("-"))
        assert not any(s <= start < e or s <= end < e for s, e in kept), (seen.range, kept)


def test_a_partial_file_from_an_earlier_run_is_completed(proxy, bucket, tmp_path):
    fetch(proxy.url, bucket, tmp_path)  # learn the folder name, then rewind to a half-done file
    (model,) = tmp_path.glob("s3/*/model.safetensors")
    model.unlink()
    (model.parent / ".complete").unlink()
    half = len(WEIGHTS) // 2
    partial = model.with_name("model.safetensors.partial")
    partial.write_bytes(WEIGHTS[:half] + bytes(len(WEIGHTS) - half))
    partial.with_name(partial.name + ".ranges").write_text(f"0 {half}\n")
    before = len(proxy.seen)
    assert_model(fetch(proxy.url, bucket, tmp_path))
    starts = sorted(s.range_start for s in proxy.seen[before:] if s.path.endswith(".safetensors"))
    assert starts == [half, half + MiB, half + 2 * MiB]  # the rest, in parts


def test_a_checksum_mismatch_is_refetched_once_then_fails_with_the_name(
        proxy, moto_endpoint, tmp_path, caplog):
    bucket = new_bucket(moto_endpoint, FILES, manifest_of(FILES, model="0" * 64))
    with pytest.raises(WeightsError, match=r"Checksum mismatch for model\.safetensors"):
        fetch(proxy.url, bucket, tmp_path)
    firsts = [s for s in proxy.gets("model/model.safetensors") if s.range_start == 0]
    assert len(firsts) == 2  # fetched, removed, fetched once more
    assert "fetching it once more" in caplog.text
    (folder,) = (p for p in (tmp_path / "s3").iterdir() if p.is_dir())
    assert not (folder / "model.safetensors").exists()
    assert not list(folder.glob("*.partial*"))
    assert not (folder / ".complete").exists()


def test_a_corrupt_partial_is_removed_and_fetched_again(proxy, bucket, tmp_path, caplog):
    fetch(proxy.url, bucket, tmp_path)
    (model,) = tmp_path.glob("s3/*/model.safetensors")
    model.unlink()
    (model.parent / ".complete").unlink()
    partial = model.with_name("model.safetensors.partial")
    partial.write_bytes(os.urandom(len(WEIGHTS)))  # "complete", and wrong
    partial.with_name(partial.name + ".ranges").write_text(f"0 {len(WEIGHTS)}\n")
    with caplog.at_level(logging.WARNING, logger="serve_app.weights"):
        assert_model(fetch(proxy.url, bucket, tmp_path))
    assert "fetching it once more" in caplog.text


@pytest.mark.parametrize("planted", ["model.safetensors.partial", "the folder"])
def test_a_link_planted_in_the_bucket_sources_cache_is_refused(proxy, bucket, tmp_path, planted):
    fetch(proxy.url, bucket, tmp_path)  # learn the folder name, then plant a link in it
    (model,) = tmp_path.glob("s3/*/model.safetensors")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file").write_bytes(b"precious")
    model.unlink()
    if planted == "the folder":
        folder = model.parent
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
        folder.symlink_to(outside)
    else:
        model.with_name(planted).symlink_to(outside / "file")
    before = len(proxy.gets("model/model.safetensors"))
    with pytest.raises(CacheError, match="symbolic link"):
        fetch(proxy.url, bucket, tmp_path)
    assert sorted(p.name for p in outside.iterdir()) == ["file"]
    assert (outside / "file").read_bytes() == b"precious"
    assert len(proxy.gets("model/model.safetensors")) == before


REPLICA = """
import sys
from serve_app.weights.s3 import fetch_s3_model
from tests.infra.weights_fakes import SMALL, options
print(fetch_s3_model(sys.argv[1], sys.argv[2], options(sys.argv[3]), tuning=SMALL))
"""


def test_two_replicas_starting_at_once_download_once(proxy, bucket, tmp_path):
    # Two processes, as two replicas on one node. The weights are held until both have read
    # the manifest: the second then finds the folder incomplete and must wait on the lock
    # while the first downloads.
    proxy.hold = lambda seen: (seen.path.endswith("model.safetensors")
                               and len(proxy.gets("manifest.json")) < 2)
    proxy.hold_timeout_s = 60
    replicas = [subprocess.Popen(
        [sys.executable, "-c", REPLICA, f"s3://{bucket}/model", str(tmp_path), proxy.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}) for _ in range(2)]
    outputs = [r.communicate(timeout=120) for r in replicas]
    assert [r.returncode for r in replicas] == [0, 0], outputs
    folders = {out.strip() for out, _ in outputs}
    assert len(folders) == 1
    assert_model(Path(folders.pop()))
    assert len(proxy.gets("manifest.json")) == 2
    assert sorted(p.range_start for p in proxy.gets("model/model.safetensors")) == [
        0, MiB, 2 * MiB, 3 * MiB, 4 * MiB]


def test_resolve_model_fetches_once_and_then_serves_from_the_cache(proxy, bucket, tmp_path):
    opts = options(proxy.url)
    folder = resolve_model(f"s3://{bucket}/model", tmp_path, s3=opts)
    assert_model(folder)
    before = len(proxy.seen)
    assert resolve_model(f"s3://{bucket}/model/", tmp_path, s3=opts) == folder
    assert [s.path.split("?")[0] for s in proxy.seen[before:]] == [f"/{bucket}/model/manifest.json"]


def test_missing_credentials(moto_endpoint, bucket, tmp_path):
    with pytest.raises(WeightsError, match="No credentials for s3://.*AWS_ACCESS_KEY_ID"):
        fetch_s3_model(f"s3://{bucket}/model", tmp_path, S3Options(endpoint_url=moto_endpoint,
                                                                  region="us-east-1"))


def test_credentials_from_the_environment(monkeypatch, moto_endpoint, bucket, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    assert_model(resolve_model(f"s3://{bucket}/model", tmp_path))


def test_missing_bucket(moto_endpoint, tmp_path):
    with pytest.raises(WeightsError, match="No bucket 'no-such-bucket'"):
        fetch(moto_endpoint, "no-such-bucket", tmp_path)


def test_missing_manifest(moto_endpoint, tmp_path):
    bucket = new_bucket(moto_endpoint, FILES, manifest=None)
    with pytest.raises(WeightsError, match=r"manifest\.json not found.*serve_app manifest"):
        fetch(moto_endpoint, bucket, tmp_path)


def test_a_file_the_manifest_lists_but_the_bucket_lacks(moto_endpoint, tmp_path):
    bucket = new_bucket(moto_endpoint, {"config.json": CONFIG}, manifest_of(FILES))
    with pytest.raises(WeightsError, match=r"model\.safetensors not found.*manifest lists"):
        fetch(moto_endpoint, bucket, tmp_path)


def test_an_invalid_manifest(moto_endpoint, tmp_path):
    bucket = new_bucket(moto_endpoint, FILES, b'{"version": 1, "files": [{"name": "../x"}]}')
    with pytest.raises(WeightsError, match="manifest.json.*name, size and sha256"):
        fetch(moto_endpoint, bucket, tmp_path)


def test_a_wrong_endpoint(tmp_path):
    import socket

    with socket.socket() as s:  # a loopback port where nothing listens
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(WeightsError, match=f"Cannot reach the S3 endpoint {closed}"):
        fetch(closed, "bucket", tmp_path)


def test_a_non_s3_endpoint_is_a_clear_error(tmp_path):
    from pytest_httpserver import HTTPServer

    with HTTPServer(host="127.0.0.1") as server:
        server.expect_request("/bucket/model/manifest.json").respond_with_data("nope", 404)
        with pytest.raises(WeightsError, match="manifest.json not found"):
            fetch(server.url_for("").rstrip("/"), "bucket", tmp_path)


def test_no_secret_in_the_options_repr_or_the_log(moto_endpoint, tmp_path, caplog):
    opts = options(moto_endpoint)
    assert "testing-secret" not in repr(opts)
    bucket = new_bucket(moto_endpoint, FILES, manifest_of(FILES))
    with caplog.at_level(logging.DEBUG, logger="serve_app"):
        fetch_s3_model(f"s3://{bucket}/model", tmp_path, opts, tuning=SMALL)
    assert "Fetching s3://" in caplog.text
    assert "testing-secret" not in caplog.text


def test_path_style_for_s3_compatible_endpoints():
    client = make_s3_client(S3Options(endpoint_url="https://ns.compat.objectstorage.sa-saopaulo-1"
                                      ".oraclecloud.com", region="sa-saopaulo-1", **{
                                          "access_key_id": "a", "secret_access_key": "b"}))
    assert client.meta.config.s3 == {"addressing_style": "path"}
    aws = make_s3_client(S3Options(region="us-east-1", access_key_id="a", secret_access_key="b"))
    assert not (aws.meta.config.s3 or {}).get("addressing_style")


def test_tuning_reaches_the_transfer_manager():
    from serve_app.weights.s3 import S3Source

    source = S3Source(object(), "b", "p", Tuning(part_bytes=8 * MiB, concurrency=3))
    assert (source.transfer_config.multipart_chunksize, source.transfer_config.max_concurrency) == (
        8 * MiB, 3)


def test_an_unreachable_store_serves_the_copy_verified_before(proxy, bucket, tmp_path, caplog):
    folder = fetch(proxy.url, bucket, tmp_path)
    proxy.close()  # the endpoint now refuses connections
    with caplog.at_level(logging.WARNING, logger="serve_app.weights"):
        assert fetch(proxy.url, bucket, tmp_path) == folder
    assert "Cannot reach the S3 endpoint" in caplog.text
    assert "Serving the copy verified earlier" in caplog.text
    (folder / "model.safetensors").unlink()  # no complete copy: the error stands
    with pytest.raises(WeightsError, match="Cannot reach the S3 endpoint"):
        fetch(proxy.url, bucket, tmp_path)


def test_a_configuration_error_is_not_hidden_by_a_verified_copy(moto_endpoint, bucket, tmp_path):
    fetch(moto_endpoint, bucket, tmp_path)
    with pytest.raises(WeightsError, match="No credentials"):
        fetch_s3_model(f"s3://{bucket}/model", tmp_path, S3Options(endpoint_url=moto_endpoint,
                                                                  region="us-east-1"))


@pytest.mark.parametrize("status, code, message", [
    (403, "InvalidAccessKeyId", "Credentials refused"),
    (403, "SignatureDoesNotMatch", "Credentials refused"),
    (403, "AccessDenied", "Credentials refused"),
    (400, "AuthorizationHeaderMalformed", "another region or endpoint"),
])
def test_refusals_of_the_store_say_what_to_fix(tmp_path, status, code, message):
    # moto accepts any key; a store's own refusals, in S3's XML, come from a loopback fake.
    from pytest_httpserver import HTTPServer

    body = f"<Error><Code>{code}</Code><Message>refused</Message></Error>"
    with HTTPServer(host="127.0.0.1") as server:
        server.expect_request("/bucket/model/manifest.json").respond_with_data(
            body, status, content_type="application/xml")
        with pytest.raises(WeightsError, match=code) as refused:
            fetch(server.url_for("").rstrip("/"), "bucket", tmp_path)
    assert message in str(refused.value)
