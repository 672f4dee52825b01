"""The vendor's published models: folders in a bucket, handed to entitled licenses as
short-lived presigned GET URLs, so that customers need no bucket credentials, with the model's
identity signed by the vendor's key (which model these files are: the license must cover it).

Layout under ``ModelBucket.url`` (``s3://bucket/prefix``)::

    <prefix>/<model name>/<file>             the model's files, as in its local folder
    <prefix>/<model name>/manifest.json      name, size and sha256 of each (license_contract)

Publishing removes the old manifest first and writes the new one last: while files are being
replaced the model is not downloadable, rather than a mix of two versions. boto3 is imported only
when a bucket is configured.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from license_contract import (
    MANIFEST_NAME,
    MODEL_NAME,
    Manifest,
    ManifestError,
    ModelIdentity,
    build_manifest,
    parse_manifest,
)
from license_server.billing import Refusal
from license_server.signing import sign_identity, signer_of

logger = logging.getLogger("license_server")

_MISSING = {"NoSuchKey", "404", "NotFound"}


class ModelBucket(BaseModel):
    """Where published models live (env ``LICENSE_SERVER_BUCKET__<FIELD>``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(pattern=r"^s3://[^/]+", description="s3://bucket/prefix; model <name> is "
                     "published under <prefix>/<name>/.")
    endpoint_url: str | None = Field(None, description="S3 API endpoint (OCI, GCS, MinIO); "
                                     "None: AWS / AWS_ENDPOINT_URL.")
    region: str | None = Field(None, description="The bucket's region. None: AWS_REGION.")
    access_key_id: SecretStr | None = Field(None, description="None: boto3's own chain.")
    secret_access_key: SecretStr | None = Field(None, description="None: boto3's own chain.")
    url_expiry_s: int = Field(900, ge=1, le=7 * 86400, description="Lifetime of presigned URLs "
                              "(SigV4 allows at most 7 days); replicas ask again when one expires.")


@dataclass(frozen=True)
class PublishedModel:
    name: str
    manifest: Manifest


class ModelCatalog:
    """The models in the vendor bucket: publish, list, and presign for a download."""

    def __init__(self, config: ModelBucket, client: Any = None) -> None:
        self.config = config
        bucket, _, prefix = config.url.removeprefix("s3://").partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self._client = client

    def start(self) -> ModelCatalog:
        if self._client is None:
            import boto3
            from botocore.config import Config

            c = self.config
            session = boto3.session.Session(
                region_name=c.region,
                aws_access_key_id=c.access_key_id.get_secret_value() if c.access_key_id else None,
                aws_secret_access_key=(c.secret_access_key.get_secret_value()
                                       if c.secret_access_key else None))
            # Presigned URLs must be SigV4 (boto3 presigns SigV2 by default, which OCI refuses
            # and S3 is retiring); S3-compatible stores lack the CRC headers newer boto3 sends.
            config = Config(signature_version="s3v4", retries={"mode": "standard", "max_attempts": 3},
                            request_checksum_calculation="when_required",
                            response_checksum_validation="when_required")
            client = session.client("s3", endpoint_url=c.endpoint_url, config=config)
            if not client.meta.endpoint_url.split("/")[2].endswith("amazonaws.com"):
                # OCI's and GCS's S3 endpoints want the bucket in the path, not the host name.
                client = session.client("s3", endpoint_url=client.meta.endpoint_url,
                                        config=config.merge(Config(s3={"addressing_style": "path"})))
            self._client = client
        return self

    @property
    def client(self) -> Any:
        assert self._client is not None, "call start() first"
        return self._client

    def key(self, name: str, file: str = "") -> str:
        return "/".join(p for p in (self.prefix, name, file) if p)

    def manifest(self, name: str) -> Manifest | None:
        """The published manifest of ``name``; None when it is not published."""
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(name, MANIFEST_NAME))
            data = body["Body"].read()
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in _MISSING:
                return None
            raise
        return parse_manifest(data, f"s3://{self.bucket}/{self.key(name, MANIFEST_NAME)}")

    def grant(self, name: str, now: float, signing_key: Ed25519PrivateKey) -> dict[str, Any]:
        """The manifest of ``name``, a presigned GET URL per file, valid ``url_expiry_s``, and
        the model's identity (its name and manifest) signed with ``signing_key``: the replica
        checks every file against it and registers under the name it gives.

        Raises Refusal: 404 when the model is not published, 503 when the bucket fails."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            manifest = self.manifest(name)
        except (BotoCoreError, ClientError, ManifestError) as exc:
            logger.error("model %s: cannot read its manifest from the bucket: %r", name, exc)
            raise Refusal("the model store is unavailable; retry later", "weights_unavailable",
                          503) from None
        if manifest is None:
            raise Refusal(f"model {name!r} is not published on this license server",
                          "model_not_found", 404)
        expiry = self.config.url_expiry_s
        urls = {f.name: self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.key(name, f.name)},
            ExpiresIn=expiry) for f in manifest.files}
        files = json.loads(manifest.to_json())
        identity = sign_identity(ModelIdentity(model=name, manifest=files,
                                               signer=signer_of(signing_key)), signing_key)
        return {"model": name, "expires_at": now + expiry, "manifest": files, "urls": urls,
                "identity": identity}

    def publish(self, name: str, folder: str | Path,
                log: Callable[[str], None] = lambda line: None) -> Manifest:
        """Upload every file of ``folder`` under ``name`` with boto3's transfer manager
        (parallel multipart uploads), then its manifest."""
        from boto3.s3.transfer import TransferConfig

        if not MODEL_NAME.match(name):
            raise ValueError(f"model name {name!r}: letters, digits, '.', '_' and '-', "
                             "starting with a letter or digit, at most 128")
        root = Path(folder)
        manifest = build_manifest(root)
        self.client.head_bucket(Bucket=self.bucket)  # a clear error before any upload
        self.client.delete_object(Bucket=self.bucket, Key=self.key(name, MANIFEST_NAME))
        transfer = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20,
                                  max_concurrency=8)
        for entry in manifest.files:
            log(f"uploading {entry.name} ({entry.size} bytes)")
            self.client.upload_file(str(root / entry.name), self.bucket,
                                    self.key(name, entry.name), Config=transfer)
        self.client.put_object(Bucket=self.bucket, Key=self.key(name, MANIFEST_NAME),
                               Body=manifest.to_json().encode(), ContentType="application/json")
        return manifest

    def published(self) -> Iterator[PublishedModel]:
        """Every model whose manifest is in the bucket (one being published is not)."""
        base = f"{self.prefix}/" if self.prefix else ""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=base, Delimiter="/")
        for page in pages:
            for common in page.get("CommonPrefixes", []):
                name = common["Prefix"][len(base):].rstrip("/")
                manifest = self.manifest(name) if MODEL_NAME.match(name) else None
                if manifest is not None:
                    yield PublishedModel(name, manifest)
