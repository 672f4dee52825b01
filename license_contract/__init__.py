"""What the customer's app and the vendor's license server agreed on, and nothing else.

- ``signed``: how a signed document (key, lease, model identity) is spelled and checked;
- ``keys``: the license key and what it entitles;
- ``lease``: the signed permission a check-in returns, under which a cluster serves;
- ``usage``: the heartbeat and usage report schemas, the limits both sides enforce, the server
  time header and the error shape;
- ``manifest``: the manifest of a model's files, and the vendor's signed word on which model
  they are;
- ``body``: reading a request body against a byte limit, refused alike on both sides;
- ``airgap``: what an installation with no network path to the vendor carries by hand (an
  activation request, usage bundles).

Pure: no Ray, no vLLM, no network (``build_manifest`` reads the files it describes). Both
products import these names from here; neither imports the other.
"""

from license_contract.airgap import (
    GENESIS,
    ActivationRequest,
    BundleError,
    UsageBundle,
    UsageEntry,
    bundle_text,
    entry_hash,
    entry_text,
    open_bundle,
    open_request,
    request_text,
)
from license_contract.body import BodyError, read_bounded
from license_contract.keys import PREFIX, License, LicenseError, key_text, verify_key
from license_contract.lease import LEASE_PREFIX, Lease, LeaseError, lease_text, verify_lease
from license_contract.manifest import (
    MANIFEST_NAME,
    MODEL_NAME,
    Manifest,
    ManifestEntry,
    ManifestError,
    ModelIdentity,
    build_manifest,
    identity_text,
    parse_manifest,
    sha256_file,
    verify_identity,
)
from license_contract.signed import (
    SignatureError,
    b64,
    canonical,
    iso,
    load_public_key,
    public_key_text,
    unb64,
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
    DownloadRequest,
    HeartbeatRequest,
    HeartbeatResponse,
    IntervalModel,
    UsageReport,
    error_body,
    error_type,
)

__all__ = [
    "GENESIS", "ActivationRequest", "BundleError", "UsageBundle", "UsageEntry", "bundle_text",
    "entry_hash", "entry_text", "open_bundle", "open_request", "request_text",
    "LEASE_PREFIX", "MANIFEST_NAME", "MAX_BODY_BYTES", "MAX_INTERVAL_S", "MAX_REPORT_INTERVALS",
    "MODEL_NAME", "OVERLAP_TOLERANCE_S", "PREFIX", "SERVER_TIME_HEADER", "SKEW_S", "STRICT",
    "ActivateRequest", "BodyError", "DownloadRequest", "HeartbeatRequest", "HeartbeatResponse",
    "IntervalModel", "Lease", "LeaseError", "License", "LicenseError", "Manifest",
    "ManifestEntry", "ManifestError", "ModelIdentity", "SignatureError", "UsageReport", "b64",
    "build_manifest", "canonical", "error_body", "error_type", "identity_text", "iso",
    "key_text", "lease_text", "load_public_key", "parse_manifest", "public_key_text",
    "read_bounded", "sha256_file", "unb64", "verify_identity", "verify_key", "verify_lease",
]
