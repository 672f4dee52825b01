"""What the customer's app and the vendor's license server agreed on, and nothing else.

- ``keys``: the license key's format, its contents and how its signature is checked;
- ``usage``: the heartbeat and usage report schemas, the limits both sides enforce, the server
  time header and the error shape;
- ``manifest``: the manifest of a model's files (names, sizes, sha256);
- ``body``: reading a request body against a byte limit, refused alike on both sides.

Pure: no Ray, no vLLM, no network (``build_manifest`` reads the files it describes). Both
products import these names from here; neither imports the other.
"""

from license_contract.body import BodyError, read_bounded
from license_contract.keys import (
    PREFIX,
    License,
    LicenseError,
    b64,
    canonical,
    iso,
    key_text,
    load_public_key,
    public_key_text,
    unb64,
    verify_key,
)
from license_contract.manifest import (
    MANIFEST_NAME,
    MODEL_NAME,
    Manifest,
    ManifestEntry,
    ManifestError,
    build_manifest,
    parse_manifest,
    sha256_file,
)
from license_contract.usage import (
    MAX_BODY_BYTES,
    MAX_INTERVAL_S,
    MAX_REPORT_INTERVALS,
    OVERLAP_TOLERANCE_S,
    SERVER_TIME_HEADER,
    SKEW_S,
    STRICT,
    ActivateRequest,
    HeartbeatRequest,
    IntervalModel,
    UsageReport,
    error_body,
    error_type,
)

__all__ = [
    "MANIFEST_NAME", "MAX_BODY_BYTES", "MAX_INTERVAL_S", "MAX_REPORT_INTERVALS", "MODEL_NAME",
    "OVERLAP_TOLERANCE_S", "PREFIX", "SERVER_TIME_HEADER", "SKEW_S", "STRICT", "ActivateRequest",
    "BodyError", "HeartbeatRequest", "IntervalModel", "License", "LicenseError", "Manifest",
    "ManifestEntry", "ManifestError", "UsageReport", "b64", "build_manifest", "canonical",
    "error_body", "error_type", "iso", "key_text", "load_public_key", "parse_manifest",
    "public_key_text", "read_bounded", "sha256_file", "unb64", "verify_key",
]
