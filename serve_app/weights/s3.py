"""Model weights from an S3-compatible bucket: ``s3://bucket/prefix`` through boto3.

Works with AWS S3, OCI Object Storage (``https://<namespace>.compat.objectstorage.<region>
.oraclecloud.com`` with a customer secret key) and GCS (``https://storage.googleapis.com`` with an
HMAC key). The endpoint, region and keys come from ``S3Options`` (the model's config) or else from
boto3's own chain: ``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` and ~/.aws, an instance role.

The prefix holds the model's files and a ``manifest.json`` (see ``license_contract.manifest``). boto3 is
imported only here, and only when a bucket source is used (the ``s3`` extra).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from license_contract import MANIFEST_NAME, Manifest, ManifestError, parse_manifest
from serve_app.weights.fetch import (
    UNREACHABLE,
    MiB,
    RangeWriter,
    Tuning,
    WeightsError,
    fetch_model,
    fetch_or_verified_copy,
)

S3_PREFIX = "s3://"
_IO_BLOCK = MiB
# Error codes of S3 and the stores that imitate it, by what the user has to fix.
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
                     "InvalidToken", "ExpiredToken", "InvalidSecurity", "Forbidden"}
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}
_REDIRECT_CODES = {"PermanentRedirect", "301", "AuthorizationHeaderMalformed"}


@dataclass(frozen=True)
class S3Options:
    """Where the bucket is and how to sign requests; None leaves a value to boto3's chain."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")`` (no trailing slash)."""
    if not url.startswith(S3_PREFIX):
        raise WeightsError(f"{url!r} is not an s3://bucket/prefix URL.")
    bucket, _, prefix = url[len(S3_PREFIX):].partition("/")
    if not bucket:
        raise WeightsError(f"{url!r} names no bucket; expected s3://bucket/prefix.")
    return bucket, prefix.strip("/")


def make_s3_client(options: S3Options, tuning: Tuning = Tuning()) -> Any:
    """A boto3 S3 client for AWS or an S3-compatible store."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise WeightsError("s3:// model sources need boto3: pip install 'serve-app[s3]'") from None
    session = boto3.session.Session(
        aws_access_key_id=options.access_key_id,
        aws_secret_access_key=options.secret_access_key,
        region_name=options.region,
    )
    # Checksums: S3-compatible stores reject or lack the CRC headers newer boto3 sends by
    # default. Pool: one connection per parallel part, or the transfer manager's threads queue.
    base = dict(request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                max_pool_connections=max(10, tuning.concurrency),
                retries={"mode": "standard", "max_attempts": 3})
    client = session.client("s3", endpoint_url=options.endpoint_url, config=Config(**base))
    if not client.meta.endpoint_url.split("/")[2].endswith("amazonaws.com"):
        # OCI's and GCS's S3 endpoints want the bucket in the path, not in the host name.
        client = session.client("s3", endpoint_url=client.meta.endpoint_url,
                                config=Config(s3={"addressing_style": "path"}, **base))
    return client


class S3Source:
    """The files under ``s3://bucket/prefix``, read with one boto3 client."""

    def __init__(self, client: Any, bucket: str, prefix: str, tuning: Tuning = Tuning()) -> None:
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import (
            ConnectionClosedError,
            EndpointConnectionError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )

        self._client, self.bucket, self.prefix = client, bucket, prefix
        self.transfer_config = TransferConfig(
            multipart_threshold=tuning.part_bytes, multipart_chunksize=tuning.part_bytes,
            max_concurrency=tuning.concurrency, num_download_attempts=tuning.attempts,
            io_chunksize=_IO_BLOCK, use_threads=True)
        self.retryable = (ResponseStreamingError, IncompleteReadError, ReadTimeoutError,
                          ConnectionClosedError, EndpointConnectionError)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def describe(self, name: str) -> str:
        return f"{S3_PREFIX}{self.bucket}/{self.key(name)}"

    def read_manifest(self) -> Manifest:
        origin = self.describe(MANIFEST_NAME)
        with self._errors(MANIFEST_NAME):
            body = self._client.get_object(Bucket=self.bucket, Key=self.key(MANIFEST_NAME))["Body"]
            data = body.read()
        try:
            return parse_manifest(data, origin)
        except ManifestError as exc:
            raise WeightsError(f"{exc}. Publish it with: python -m serve_app manifest FOLDER "
                               "> manifest.json") from None

    def download(self, name: str, size: int, out: RangeWriter) -> None:
        """The whole object, through boto3's transfer manager: parallel ranged GETs."""
        with self._errors(name):
            self._client.download_fileobj(self.bucket, self.key(name), _OffsetFile(out),
                                          Config=self.transfer_config)

    def read_range(self, name: str, start: int, end: int) -> Iterator[bytes]:
        with self._errors(name):
            response = self._client.get_object(Bucket=self.bucket, Key=self.key(name),
                                               Range=f"bytes={start}-{end - 1}")
        # A store that ignores Range answers with the whole object; its bytes would land at
        # the wrong offsets.
        content_range = response.get("ContentRange") or ""
        if not content_range.startswith(f"bytes {start}-"):
            raise WeightsError(f"{self.describe(name)}: asked for bytes {start}-{end - 1}, got "
                               f"{content_range or 'no Content-Range'}; the endpoint does not "
                               "serve ranged GETs.")
        yield from response["Body"].iter_chunks(_IO_BLOCK)

    @contextlib.contextmanager
    def _errors(self, name: str) -> Iterator[None]:
        from botocore.exceptions import (
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
            SSLError,
        )
        from s3transfer.exceptions import RetriesExceededError

        endpoint = self._client.meta.endpoint_url
        where = self.describe(name)
        try:
            yield
        except (NoCredentialsError, PartialCredentialsError):
            raise WeightsError(
                f"No credentials for {where}: set s3_access_key_id and s3_secret_access_key in "
                "the model's config (SERVE_APP_S3_ACCESS_KEY_ID / SERVE_APP_S3_SECRET_ACCESS_KEY) "
                "or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (OCI: a customer secret key; GCS: "
                "an HMAC key).") from None
        except (EndpointConnectionError, ConnectTimeoutError, SSLError) as exc:
            raise WeightsError(
                f"Cannot reach the S3 endpoint {endpoint} for {where} ({type(exc).__name__}): "
                "check s3_endpoint_url (or AWS_ENDPOINT_URL) and the network.",
                code=UNREACHABLE) from None
        except RetriesExceededError as exc:
            raise WeightsError(
                f"Could not fetch {where}: the connection failed repeatedly ({exc}). Run again "
                "to resume where it stopped.", code=UNREACHABLE) from None
        except ClientError as exc:
            raise self._client_error(exc, where, endpoint) from None

    def _client_error(self, exc: Any, where: str, endpoint: str) -> WeightsError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        detail = f"{code}: {error.get('Message', '')}".strip(": ")
        if code == "NoSuchBucket":
            return WeightsError(f"No bucket {self.bucket!r} at {endpoint} ({detail}): check the "
                                "model source and s3_endpoint_url / s3_region.")
        if code in _MISSING_KEY_CODES:
            hint = (" Publish the model's manifest next to its files: python -m "
                    "serve_app manifest FOLDER > manifest.json" if where.endswith(MANIFEST_NAME)
                    else " The manifest lists a file the bucket does not hold.")
            return WeightsError(f"{where} not found at {endpoint} ({detail}).{hint}")
        if code in _REDIRECT_CODES:
            return WeightsError(f"{endpoint} refused {where} ({detail}): the bucket lives in "
                                "another region or endpoint; set s3_region / s3_endpoint_url.")
        if code in _CREDENTIAL_CODES:
            return WeightsError(f"Credentials refused for {where} at {endpoint} ({detail}): "
                                "check the access key, its secret and its permissions.")
        return WeightsError(f"{where} at {endpoint} failed: {detail or exc}")


class _OffsetFile:
    """The seekable file the transfer manager writes its parts into, one thread at a time
    (its IO thread); it lands in a ``RangeWriter``."""

    def __init__(self, out: RangeWriter) -> None:
        self._out, self._position = out, 0

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0:
            raise OSError("only absolute seeks")
        self._position = offset
        return offset

    def tell(self) -> int:
        return self._position

    def write(self, data: bytes) -> int:
        self._out.write(self._position, data)
        self._position += len(data)
        return len(data)


def fetch_s3_model(url: str, cache_dir: str | Path, options: S3Options = S3Options(), *,
                   client: Any = None, tuning: Tuning = Tuning()) -> Path:
    """Fetch ``s3://bucket/prefix`` into ``cache_dir`` (once per node) and return the folder.

    ``client`` replaces the boto3 client built from ``options`` (tests point it at a fake).
    """
    bucket, prefix = parse_s3_url(url)
    # One folder per bucket and prefix; the hash keeps names from different prefixes apart
    # without nesting the cache as deep as the bucket.
    tag = hashlib.sha256(f"{bucket}/{prefix}".encode()).hexdigest()[:12]
    folder = Path(cache_dir) / "s3" / f"{prefix.rsplit('/', 1)[-1] or bucket}-{tag}"
    source = S3Source(client or make_s3_client(options, tuning), bucket, prefix, tuning)
    return fetch_or_verified_copy(
        folder, source.read_manifest,
        lambda manifest: fetch_model(manifest, source, folder, within=Path(cache_dir),
                                     tuning=tuning),
        within=Path(cache_dir))
