"""The vendor's weights under license: the model source ``licensed:<model-name>``.

The replica presents its license key to the license server named in the key
(``POST /v1/models/<name>/download``) and gets back the model's manifest, a presigned GET URL
per file on the vendor's bucket, valid for minutes, and the model's identity: its name and
manifest, signed by the key that signed the license (``license_contract.ModelIdentity``). The
identity is checked before any file is fetched (its signer, its name, its manifest against the
grant's) and kept in the cache folder (``identity.IDENTITY_STAMP``): the replica registers under
the model it names. The files come through plain ranged GETs (httpx; no bucket credentials, no
boto3 on the customer's side) into ``fetch_model``: parallel parts, resume, verify against the
signed manifest, one download per node. A URL that expired meanwhile (the bucket answers 403, or
400/401 on some stores) is replaced by asking the server again; the range is retried.

An invalid, expired or revoked license, or a model it does not cover, is refused by the server
(401/403/404) and fails the replica with the server's reason. When the server cannot be reached,
a copy verified earlier is served (the license actor's grace period governs serving, not this).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from license_contract import (
    MODEL_NAME,
    LicenseError,
    Manifest,
    ManifestError,
    parse_manifest,
    verify_identity,
    verify_key,
)
from serve_app.errors import ConfigError
from serve_app.weights.fetch import (
    UNREACHABLE,
    MiB,
    Tuning,
    WeightsError,
    fetch_model,
    fetch_or_verified_copy,
)
from serve_app.weights.identity import read_identity, store_identity

if TYPE_CHECKING:
    from serve_app.licensing import LicenseConfig

logger = logging.getLogger(__name__)

LICENSED_PREFIX = "licensed:"
REFUSED = "model_download_refused"  # the code of a WeightsError for the server's refusal
UNTRUSTED = "model_identity_untrusted"  # a grant whose signed identity does not check
# What stores answer a presigned URL past its expiry: S3 403, GCS 400, some others 401.
_EXPIRED_STATUSES = (400, 401, 403)
_BLOCK = MiB


@dataclass(frozen=True)
class Grant:
    """What the license server handed out: the manifest, a URL per file, and the model's
    identity as the server signed it (``identity``, checked: it names this manifest)."""

    manifest: Manifest
    urls: dict[str, str]
    identity: str


def request_grant(http: httpx.Client, server_url: str, key: str, name: str,
                  signer: str) -> Grant:
    """Ask the license server for model ``name``; raise WeightsError with its reason. The
    grant's identity must be signed by ``signer`` (the license's) and name ``name`` and the
    grant's manifest."""
    url = f"{server_url.rstrip('/')}/v1/models/{name}/download"
    try:
        response = http.post(url, headers={"Authorization": f"Bearer {key}"})
    except httpx.TransportError as exc:
        raise WeightsError(f"Cannot reach the license server at {server_url} for model {name!r} "
                           f"({type(exc).__name__}: {exc}).", code=UNREACHABLE) from None
    detail = _error_detail(response)
    if response.status_code == 429 or response.status_code >= 500:
        raise WeightsError(f"The license server at {server_url} could not hand out model "
                           f"{name!r} now ({response.status_code}: {detail}).", code=UNREACHABLE)
    if response.status_code != 200:
        raise WeightsError(f"The license server refused model {name!r} for this license "
                           f"({response.status_code}: {detail}).", code=REFUSED)
    try:
        doc = response.json()
        manifest = parse_manifest(json.dumps(doc["manifest"]), f"{url} manifest")
        urls = {f.name: str(doc["urls"][f.name]) for f in manifest.files}
        text = doc["identity"]
        if not isinstance(text, str):
            raise TypeError("identity is not a string")
    except (ValueError, KeyError, TypeError, ManifestError) as exc:
        raise WeightsError(f"The license server's answer for model {name!r} is not a download "
                           f"grant ({exc}); is {server_url} the vendor's license server?") from None
    try:
        identity, signed = verify_identity(text, signers=frozenset({signer}))
    except ManifestError as exc:
        raise WeightsError(f"The license server's grant for model {name!r} carries no identity "
                           f"signed by the license's signer ({exc}); is {server_url} the "
                           "vendor's license server?", code=UNTRUSTED) from None
    if identity.model != name or signed != manifest:
        what = (f"model {identity.model!r}" if identity.model != name
                else "other files than the grant's manifest")
        raise WeightsError(f"The license server's grant for model {name!r} is signed as {what}: "
                           "not fetching it.", code=UNTRUSTED)
    return Grant(manifest, urls, text)


def _error_detail(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{error.get('code')}: {error.get('message')}"
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


class LicensedSource:
    """A licensed model's files, read through the presigned URLs of the latest grant."""

    retryable: tuple[type[BaseException], ...] = (httpx.TransportError,)

    def __init__(self, name: str, grant: Grant, ask: Callable[[], Grant],
                 http: httpx.Client) -> None:
        self.name = name
        self._grant, self._ask, self._http = grant, ask, http
        self._generation = 0
        self._lock = threading.Lock()
        self.refreshes = 0

    def describe(self, name: str) -> str:
        return f"{LICENSED_PREFIX}{self.name}" + (f"/{name}" if name else "")

    def _url(self, name: str) -> tuple[str, int]:
        with self._lock:
            return self._grant.urls[name], self._generation

    def _refresh(self, seen: int) -> None:
        # Under the lock: of the parts that found their URL expired at once, the first asks
        # the server and the others take its answer.
        with self._lock:
            if self._generation != seen:
                return
            grant = self._ask()
            if grant.manifest != self._grant.manifest:
                raise WeightsError(f"Model {self.name!r} was republished during the download; "
                                   "run again to fetch the new version.")
            self._grant, self._generation = grant, self._generation + 1
            self.refreshes += 1

    def read_range(self, name: str, start: int, end: int) -> Iterator[bytes]:
        for attempt in (1, 2):
            url, generation = self._url(name)
            headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
            with self._http.stream("GET", url, headers=headers) as response:
                if response.status_code in _EXPIRED_STATUSES and attempt == 1:
                    logger.info("%s: the bucket answered %d (URLs expired); asking the license "
                                "server for new ones", self.describe(name), response.status_code)
                    self._refresh(generation)
                    continue
                if response.status_code != 206:
                    response.read()
                    raise WeightsError(f"{self.describe(name)}: the vendor bucket answered "
                                       f"{response.status_code} to bytes {start}-{end - 1}: "
                                       f"{response.text[:300]}")
                # A store that ignores Range answers with the whole object; its bytes would
                # land at the wrong offsets.
                content_range = response.headers.get("content-range", "")
                if not content_range.startswith(f"bytes {start}-"):
                    raise WeightsError(f"{self.describe(name)}: asked for bytes from {start}, got "
                                       f"Content-Range {content_range!r}")
                yield from response.iter_raw(_BLOCK)
                return


def fetch_licensed_model(name: str, cache_dir: str | Path, license: LicenseConfig | None, *,
                         http: httpx.Client | None = None, tuning: Tuning = Tuning()) -> Path:
    """Fetch licensed model ``name`` into ``cache_dir`` (once per node) and return the folder.

    ``http`` replaces the client used for the license server and the bucket (tests)."""
    if license is None:
        raise ConfigError(f"The model source {LICENSED_PREFIX}{name} needs the license: set "
                          "license_key (the key says which server to ask).")
    if not MODEL_NAME.match(name):
        raise ConfigError(f"{LICENSED_PREFIX}{name!r}: not a model name (letters, digits, '.', "
                          "'_' and '-'), e.g. licensed:smollm2-135m-instruct.")
    key = license.key.get_secret_value()
    try:
        # Expiry and revocation are the server's to judge: it answers with the reason.
        lic = verify_key(key, check_expiry=False)
    except LicenseError as exc:
        raise ConfigError(f"{LICENSED_PREFIX}{name}: {exc}", code=exc.code) from None
    cache = Path(cache_dir)
    folder = cache / "licensed" / name
    own = http is None
    http = http or httpx.Client(timeout=httpx.Timeout(60.0, connect=10.0),
                                limits=httpx.Limits(max_connections=tuning.concurrency + 2))
    try:
        def ask() -> Grant:
            return request_grant(http, lic.server_url, key, name, lic.signer)

        def fetch(grant: Grant) -> Path:
            fetch_model(grant.manifest, LicensedSource(name, grant, ask, http), folder,
                        within=cache, tuning=tuning)
            store_identity(folder, grant.identity, within=cache)
            return folder

        fetch_or_verified_copy(folder, ask, fetch, within=cache)
    finally:
        if own:
            http.close()
    # Fetched now or verified before (the server unreachable): either way the folder's files
    # must be the ones its kept identity names, signed by the license's signer.
    identity = read_identity(folder, frozenset({lic.signer}), within=cache)
    if identity is None or identity.model != name:
        raise WeightsError(f"{folder} keeps no identity of model {name!r} signed by the license "
                           "server; it is fetched again once the server can be reached.",
                           code=UNTRUSTED)
    return folder
