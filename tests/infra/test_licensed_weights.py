"""The vendor's weights under license: the license server presigns, the replica downloads.

Real boto3 (the server's publishing and presigning) against moto's S3 server on loopback, the real
license server (uvicorn) and the replica's plain httpx ranged GETs. moto does not enforce the
expiry of presigned URLs; ``ExpiringGateway`` in front of it does, as S3 does, on a clock the
test moves.
"""
# ruff: noqa: F811 - fixtures imported from weights_fakes are parameters here

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from calendar import timegm
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from starlette.testclient import TestClient

from license_contract import ModelIdentity, build_manifest, parse_manifest, verify_identity
from license_server.app import IssueRequest, build_app
from license_server.catalog import ModelBucket
from license_server.cli import main
from license_server.signing import new_private_key, sign_identity, sign_license, signer_of
from serve_app.errors import ConfigError
from serve_app.licensing import LicenseConfig
from serve_app.weights.cache import CacheError
from serve_app.weights.fetch import UNREACHABLE, MiB, WeightsError
from serve_app.weights.licensed import REFUSED, UNTRUSTED, fetch_licensed_model
from serve_app.weights.s3 import make_s3_client
from serve_app.weights.sources import claimed_identity, confirmed_identity, resolve_model
from tests.conftest import LicenseServerProcess
from tests.fakes import VENDOR_KEY, issue_key
from tests.infra.weights_fakes import (  # noqa: F401 - fixtures
    FAKE_KEYS,
    SMALL,
    aws_sandbox,
    moto_endpoint,
    new_bucket,
    options,
)

pytestmark = pytest.mark.usefixtures("aws_sandbox")

NAME = "tiny-llm"
WEIGHTS = os.urandom(4 * MiB + 12345)  # five parts of 1 MiB, the last one short
CONFIG = b'{"architectures": ["LlamaForCausalLM"]}'
FILES = {"config.json": CONFIG, "model.safetensors": WEIGHTS}


class ExpiringGateway:
    """An HTTP forwarder to moto that refuses presigned URLs past their expiry as S3 does
    (403 AccessDenied "Request has expired"), by ``X-Amz-Date`` + ``X-Amz-Expires`` against
    ``time.time() + offset``. Records each GET's exact request target and status."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.offset = 0.0
        self.gets: list[tuple[str, str | None, int]] = []  # (target, Range, status)
        self.on_get = lambda target: None  # called before a GET is answered
        self._lock = threading.Lock()
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                gateway._forward(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self._http = httpx.Client(base_url=upstream, timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._http.close()

    def expired(self, target: str) -> bool:
        query = parse_qs(urlsplit(target).query)
        if "X-Amz-Expires" not in query:
            return False
        signed = timegm(time.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ"))
        return time.time() + self.offset > signed + int(query["X-Amz-Expires"][0])

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        target = handler.path
        length = int(handler.headers.get("content-length") or 0)
        body = handler.rfile.read(length) if length else b""
        if handler.command == "GET":
            self.on_get(target)
        if handler.command == "GET" and self.expired(target):
            status, headers = 403, {"content-type": "application/xml"}
            content = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code>"
                       b"<Message>Request has expired</Message></Error>")
        else:
            skip = {"host", "connection", "expect", "content-length", "transfer-encoding"}
            upstream = self._http.request(
                handler.command, target, content=body,
                headers=[(k, v) for k, v in handler.headers.items() if k.lower() not in skip])
            status, content = upstream.status_code, upstream.content
            headers = {k: v for k, v in upstream.headers.items()
                       if k.lower() not in ("connection", "transfer-encoding", "content-length")}
        if handler.command == "GET":
            with self._lock:
                self.gets.append((target, handler.headers.get("range"), status))
        handler.send_response(status)
        for k, v in headers.items():
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(content)


@pytest.fixture
def gateway(moto_endpoint):
    g = ExpiringGateway(moto_endpoint)
    yield g
    g.close()


@pytest.fixture
def vendor(gateway, moto_endpoint, tmp_path):
    """A fresh vendor bucket (reached through the gateway) with NAME published by the admin CLI,
    and the license server presigning from it."""
    bucket = new_bucket(moto_endpoint, {}, None)
    settings = ModelBucket(url=f"s3://{bucket}/models", endpoint_url=gateway.url,
                           region="us-east-1", url_expiry_s=600, **FAKE_KEYS)
    folder = tmp_path / "published"
    folder.mkdir()
    for name, data in FILES.items():
        (folder / name).write_bytes(data)
    server = LicenseServerProcess(tmp_path / "license_server", bucket=settings).start()
    server.bucket, server.folder = settings, folder
    server.catalog = server.service.catalog
    server.catalog.publish(NAME, folder)
    yield server
    server.stop()


def downloads(server) -> list[bytes]:
    return [r for r in server.received if r.startswith(b"/v1/models/")]


def presigned_gets(gateway) -> list[str]:
    return [t for t, _, _ in gateway.gets if "X-Amz-Signature=" in t]


def license_config(server, tmp_path, **issue):
    _, key = server.issue(**issue)
    return server.license_config(key, tmp_path / "ledger.db")


def post(server, name, key):
    return httpx.post(f"{server.url}/v1/models/{name}/download",
                      headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=30)


def issue_expired(server) -> str:
    now = time.time()
    lic, key = issue_key(server.service.signing_key, customer="Late", issued_at=now - 10,
                         expires_at=now - 1, server_url=server.url)
    server.service.record_issued(lic, key)
    return key


# -- the server: presigned URLs for an entitled model, refusals for the rest ------------------


def test_an_entitled_license_gets_the_manifest_and_presigned_urls_and_is_not_metered(vendor):
    lic, key = vendor.issue(models=(NAME,))
    asked_at = time.time()
    response = post(vendor, NAME, key)
    assert response.status_code == 200, response.text
    assert "x-server-time" in response.headers
    grant = response.json()
    assert grant["manifest"] == {"version": 1, "files": [
        {"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
        for n, d in FILES.items()]}
    assert set(grant["urls"]) == set(FILES)
    # The vendor's word on which model these files are, signed with the key of its licenses.
    identity, signed = verify_identity(grant["identity"], signers={lic.signer})
    assert (identity.model, identity.manifest, identity.signer) == (NAME, grant["manifest"],
                                                                    vendor.service.public_key)
    assert signed == parse_manifest(json.dumps(grant["manifest"]))
    # url_expiry_s after the server granted it: between the request and the server's answer
    # (whose header is rounded to the millisecond).
    answered_at = float(response.headers["x-server-time"]) + 0.0005
    assert asked_at + 600 <= grant["expires_at"] <= answered_at + 600
    for name, url in grant["urls"].items():
        query = parse_qs(urlsplit(url).query)
        assert url.startswith(f"{vendor.bucket.endpoint_url}/{vendor.catalog.bucket}/models/"
                              f"{NAME}/{name}?")
        assert query["X-Amz-Expires"] == ["600"] and "X-Amz-Signature" in query
        assert httpx.get(url).content == FILES[name]  # no credentials: the URL is the grant
    # The secret never leaves the server.
    assert FAKE_KEYS["secret_access_key"] not in response.text
    # Downloads are not serving: no activation, no instance, no usage.
    assert vendor.service.store.clusters_of(lic.license_id) == []
    assert vendor.service.store.total_instance_seconds(lic.license_id) == 0
    assert vendor.service.usage(lic.license_id)["usage"] == []


@pytest.mark.parametrize("case, status, code", [
    ("no key", 401, "unauthorized"),
    ("bad key", 401, "license_malformed"),
    ("another vendor's key", 401, "license_untrusted_signer"),
    ("revoked", 403, "license_revoked"),
    ("expired", 403, "license_expired"),
    ("unentitled model", 403, "model_not_licensed"),
    ("unpublished model", 404, "model_not_found"),
])
def test_no_urls_for_the_rest(vendor, case, status, code):
    name = "unpublished-llm" if case == "unpublished model" else NAME
    if case == "another vendor's key":
        lic, _ = vendor.issue()
        other = new_private_key()
        key = sign_license(lic.model_copy(update={"signer": signer_of(other)}), other)
    elif case == "expired":
        key = issue_expired(vendor)
    else:
        lic, key = vendor.issue(models=("other-llm",) if case == "unentitled model" else ("*",))
        if case == "revoked":
            vendor.service.store.revoke(lic.license_id)
    key = {"no key": "", "bad key": "MTL1.garbage"}.get(case, key)
    response = post(vendor, name, key)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert "urls" not in response.text and "X-Amz" not in response.text
    assert "x-server-time" in response.headers


def test_a_server_without_a_bucket_publishes_nothing_and_works_as_before(tmp_path):
    from license_server.cli import LicenseServerSettings, build_service

    service, token = build_service(LicenseServerSettings(data_dir=str(tmp_path)))
    assert service.catalog is None
    _, key = service.issue(IssueRequest(models=("*",), customer="ACME"))
    with TestClient(build_app(service, token)) as client:
        auth = {"Authorization": f"Bearer {key}"}
        response = client.post(f"/v1/models/{NAME}/download", headers=auth)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "model_not_found"
        assert client.get("/v1/status", headers=auth).json()["status"] == "active"
        bad = client.post("/v1/models/..%2Fx/download", headers=auth)
        assert bad.status_code in (400, 404) and "x-server-time" in bad.headers


def test_publish_model_and_models_through_the_admin_cli(gateway, moto_endpoint, tmp_path,
                                                        monkeypatch, capsys):
    bucket = new_bucket(moto_endpoint, {}, None)
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_bytes(CONFIG)
    (folder / "sub" / "model.safetensors").write_bytes(WEIGHTS)
    for field, value in {"URL": f"s3://{bucket}/vendor/models", "ENDPOINT_URL": gateway.url,
                         "REGION": "us-east-1", "ACCESS_KEY_ID": FAKE_KEYS["access_key_id"],
                         "SECRET_ACCESS_KEY": FAKE_KEYS["secret_access_key"]}.items():
        monkeypatch.setenv(f"LICENSE_SERVER_BUCKET__{field}", value)
    monkeypatch.setenv("LICENSE_SERVER_DATA_DIR", str(tmp_path / "data"))

    main(["publish-model", "--name", NAME, "--folder", str(folder)])
    assert f"published {NAME}: 2 files" in capsys.readouterr().out
    main(["models"])
    assert capsys.readouterr().out.split() == [NAME, "2", "files", str(len(CONFIG) + len(WEIGHTS)),
                                               "bytes"]
    s3 = make_s3_client(options(moto_endpoint))

    def stored(key: str) -> bytes:
        return s3.get_object(Bucket=bucket, Key=f"vendor/models/{NAME}/{key}")["Body"].read()

    assert stored("manifest.json").decode() == build_manifest(folder).to_json()
    assert stored("sub/model.safetensors") == WEIGHTS
    assert not (tmp_path / "data").exists()  # the bucket commands leave the database alone

    with pytest.raises(SystemExit, match="model name"):
        main(["publish-model", "--name", "../x", "--folder", str(folder)])


# -- the replica: licensed:<name> through the presigned URLs ----------------------------------


def test_a_full_download_through_presigned_urls_with_no_bucket_credentials(vendor, gateway,
                                                                           tmp_path):
    license = license_config(vendor, tmp_path, models=(NAME,))
    folder = fetch_licensed_model(NAME, tmp_path / "cache", license, tuning=SMALL)
    assert folder == tmp_path / "cache" / "licensed" / NAME
    assert {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")} == FILES
    # The signed identity is kept beside the files: the model's identity is what it names.
    kept, signed = verify_identity((folder / ".identity").read_text(),
                                   signers={vendor.service.public_key})
    assert kept.model == NAME and (folder / ".complete").read_text() == signed.to_json()
    assert confirmed_identity(f"licensed:{NAME}", folder, "served-as", license) == NAME
    parts = [(t, r) for t, r, s in gateway.gets if "model.safetensors" in t]
    assert sorted(r for _, r in parts) == sorted(
        f"bytes={s}-{min(s + MiB, len(WEIGHTS)) - 1}" for s in range(0, len(WEIGHTS), MiB))
    # httpx sent the presigned URL exactly as signed (a re-encoded query breaks the signature).
    signed = vendor.catalog.grant(NAME, 0, vendor.service.signing_key)["urls"]["model.safetensors"]
    assert all(t.split("?")[0] == urlsplit(signed).path for t, _ in parts)
    assert all("X-Amz-Signature=" in t and "%2F" in t for t, _ in parts)

    # Once there, a restart asks the server and fetches nothing.
    before = len(presigned_gets(gateway))
    assert resolve_model(f"licensed:{NAME}", tmp_path / "cache", license=license) == folder
    assert len(presigned_gets(gateway)) == before
    assert len(downloads(vendor)) == 2


def test_urls_that_expire_mid_download_are_refreshed(vendor, gateway, tmp_path):
    license = license_config(vendor, tmp_path, models=(NAME,))
    moved = []

    def expire_after_the_first_part(target: str) -> None:
        # The first grant's URLs (600 s) are past their expiry once the clock moves an hour;
        # the server signs the next ones for two hours.
        if "model.safetensors" in target and not moved:
            moved.append(target)
            gateway.offset = 3600
            vendor.catalog.config = vendor.bucket.model_copy(update={"url_expiry_s": 7200})

    gateway.on_get = expire_after_the_first_part
    folder = fetch_licensed_model(NAME, tmp_path / "cache", license, tuning=SMALL)
    assert (folder / "model.safetensors").read_bytes() == WEIGHTS
    statuses = [s for t, _, s in gateway.gets if "model.safetensors" in t]
    assert 403 in statuses and statuses.count(206) == 5
    assert len(downloads(vendor)) == 2  # the first grant and one refresh, however many parts


def test_a_model_republished_mid_download_is_not_mixed_with_the_old_one(vendor, gateway,
                                                                          tmp_path):
    license = license_config(vendor, tmp_path, models=(NAME,))
    republished = []

    def republish_after_the_first_part(target: str) -> None:
        if "model.safetensors" in target and not republished:
            republished.append(target)
            (vendor.folder / "model.safetensors").write_bytes(WEIGHTS[::-1])
            vendor.catalog.publish(NAME, vendor.folder)
            gateway.offset = 3600  # and the old URLs expire: the next parts ask again

    gateway.on_get = republish_after_the_first_part
    with pytest.raises(WeightsError, match="republished during the download"):
        fetch_licensed_model(NAME, tmp_path / "cache", license, tuning=SMALL)
    gateway.on_get, gateway.offset = (lambda target: None), 0
    folder = fetch_licensed_model(NAME, tmp_path / "cache", license, tuning=SMALL)
    assert (folder / "model.safetensors").read_bytes() == WEIGHTS[::-1]


def test_a_refusal_reaches_the_replica_with_the_servers_reason(vendor, gateway, tmp_path):
    lic, key = vendor.issue(models=(NAME,))
    vendor.service.store.revoke(lic.license_id)
    license = vendor.license_config(key, tmp_path / "ledger.db")
    with pytest.raises(WeightsError, match=r"refused model 'tiny-llm'.*403: license_revoked") as e:
        resolve_model(f"licensed:{NAME}", tmp_path / "cache", license=license)
    assert e.value.code == REFUSED
    assert not (tmp_path / "cache" / "licensed" / NAME / "model.safetensors").exists()

    other = license_config(vendor, tmp_path, models=("other-llm",))
    with pytest.raises(WeightsError, match="403: model_not_licensed"):
        resolve_model(f"licensed:{NAME}", tmp_path / "cache", license=other)
    # Refused before any URL was handed out: no byte of the weights could move.
    assert presigned_gets(gateway) == []
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_a_licensed_source_needs_a_license_and_a_model_name(tmp_path):
    with pytest.raises(ConfigError, match="needs the license"):
        resolve_model(f"licensed:{NAME}", tmp_path)
    with pytest.raises(ConfigError, match="not a model name"):
        resolve_model("licensed:../etc", tmp_path, license=object())


def test_an_unreachable_server_serves_the_copy_verified_before(vendor, tmp_path):
    license = license_config(vendor, tmp_path, models=(NAME,))
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError, match="Cannot reach the license server") as e:
        vendor.stop()
        fetch_licensed_model(NAME, cache, license, tuning=SMALL)
    assert e.value.code == UNREACHABLE
    vendor.start()
    folder = fetch_licensed_model(NAME, cache, license, tuning=SMALL)
    vendor.stop()
    assert fetch_licensed_model(NAME, cache, license, tuning=SMALL) == folder
    # The copy is served only with the identity it was fetched with, still checked.
    stamp = folder / ".identity"
    kept = stamp.read_text()
    other_key = new_private_key()
    stamp.write_text(sign_identity(ModelIdentity(
        model=NAME, manifest=json.loads((folder / ".complete").read_text()),
        signer=signer_of(other_key)), other_key))
    with pytest.raises(WeightsError, match="not a model identity this app can trust"):
        fetch_licensed_model(NAME, cache, license, tuning=SMALL)
    manifest = json.loads((folder / ".complete").read_text())
    manifest["files"] = manifest["files"][:1]  # the vendor's word on other files
    stamp.write_text(sign_identity(ModelIdentity(model=NAME, manifest=manifest,
                                                 signer=signer_of(VENDOR_KEY)), VENDOR_KEY))
    with pytest.raises(WeightsError, match="verified files are not the ones the vendor signed"):
        fetch_licensed_model(NAME, cache, license, tuning=SMALL)
    stamp.unlink()
    with pytest.raises(WeightsError, match="keeps no identity"):
        fetch_licensed_model(NAME, cache, license, tuning=SMALL)
    stamp.write_text(kept)
    assert fetch_licensed_model(NAME, cache, license, tuning=SMALL) == folder
    vendor.start()  # the fixture stops it


# -- the signed identity: checked before any byte moves ---------------------------------------


class RewrittenGrant(httpx.BaseTransport):
    """The network, except that the license server's grants pass through ``rewrite``: what a
    server that is not the vendor's, or a grant altered on the way, would hand out."""

    def __init__(self, rewrite) -> None:
        self._network = httpx.HTTPTransport()
        self._rewrite = rewrite

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._network.handle_request(request)
        if not request.url.path.endswith("/download") or response.status_code != 200:
            return response
        response.read()
        return httpx.Response(200, json=self._rewrite(json.loads(response.content)))


def resigned(grant, key, **fields):
    identity = ModelIdentity(**{"model": NAME, "manifest": grant["manifest"],
                                "signer": signer_of(key), **fields})
    return {**grant, "identity": sign_identity(identity, key)}


def other_files(grant):
    files = [{**f, "sha256": "0" * 64} if f["name"] == "model.safetensors" else f
             for f in grant["manifest"]["files"]]
    return {**grant, "manifest": {**grant["manifest"], "files": files}}


def altered(grant):
    prefix, payload, signature = grant["identity"].split(".")
    doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    doc["model"] = "bigger-llm"
    forged = base64.urlsafe_b64encode(json.dumps(doc, sort_keys=True, separators=(",", ":"))
                                      .encode()).rstrip(b"=").decode()
    return {**grant, "identity": f"{prefix}.{forged}.{signature}"}


@pytest.mark.parametrize("case, rewrite, error", [
    ("another signer", lambda g: resigned(g, new_private_key()), "does not trust"),
    ("altered", altered, "does not match its contents"),
    ("another model", lambda g: resigned(g, VENDOR_KEY, model="other-llm"),
     "signed as model 'other-llm'"),
    ("other files", other_files, "signed as other files than the grant's manifest"),
    ("no identity", lambda g: {k: v for k, v in g.items() if k != "identity"},
     "not a download grant"),
])
def test_a_grant_whose_signed_identity_does_not_check_fetches_nothing(vendor, gateway, tmp_path,
                                                                      case, rewrite, error):
    license = license_config(vendor, tmp_path, models=(NAME,))
    with httpx.Client(transport=RewrittenGrant(rewrite)) as http, \
            pytest.raises(WeightsError, match=error) as e:
        fetch_licensed_model(NAME, tmp_path / "cache", license, http=http, tuning=SMALL)
    assert e.value.code == (UNTRUSTED if case != "no identity" else "weights_error")
    assert presigned_gets(gateway) == []
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_a_link_planted_as_the_licensed_models_folder_is_refused(vendor, gateway, tmp_path):
    license = license_config(vendor, tmp_path, models=(NAME,))
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "cache" / "licensed").mkdir(parents=True)
    (tmp_path / "cache" / "licensed" / NAME).symlink_to(outside)
    with pytest.raises(CacheError, match="symbolic link"):
        fetch_licensed_model(NAME, tmp_path / "cache", license, tuning=SMALL)
    assert list(outside.iterdir()) == [] and presigned_gets(gateway) == []


# -- which model a replica registers under ----------------------------------------------------


def a_license(tmp_path, signer=VENDOR_KEY, **fields) -> LicenseConfig:
    """A license signed by ``signer``: the session's pinned vendor key, or a development one."""
    _, key = issue_key(signer, **fields)
    return LicenseConfig(key=key, ledger_path=str(tmp_path / "ledger.db"))


def copied_cache_folder(tmp_path, signer=VENDOR_KEY, model=NAME):
    """A folder a licensed download left, copied elsewhere: the files and the signed identity."""
    folder = tmp_path / "copied"
    folder.mkdir()
    for name, data in FILES.items():
        (folder / name).write_bytes(data)
    manifest = build_manifest(folder)
    (folder / ".complete").write_text(manifest.to_json())
    (folder / ".identity").write_text(sign_identity(ModelIdentity(
        model=model, manifest=json.loads(manifest.to_json()), signer=signer_of(signer)), signer))
    return folder


def test_a_licensed_source_is_the_model_it_names_before_anything_is_fetched(tmp_path):
    # Decided with no network and without reading the license: the actor judges the name.
    assert claimed_identity(f"licensed:{NAME}", "what-clients-call-it", None) == NAME


def test_builtin_bucket_and_plain_local_sources_are_their_served_name(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_bytes(CONFIG)
    license = a_license(tmp_path)
    for source in ("builtin:smollm2-135m-instruct", "s3://bucket/prefix", str(plain)):
        assert claimed_identity(source, "chat", license) == "chat"
        assert confirmed_identity(source, plain, "chat", license) == "chat"


def test_a_copied_cache_folder_is_the_model_its_signed_identity_names(tmp_path):
    folder = copied_cache_folder(tmp_path)
    for license in (a_license(tmp_path, models=(NAME,)), a_license(tmp_path, models=("other",))):
        # Whatever it is served as, and whatever the license covers: the actor judges NAME.
        assert claimed_identity(str(folder), "my-own-model", license) == NAME
        assert confirmed_identity(str(folder), folder, "my-own-model", license) == NAME


@pytest.mark.parametrize("license", ["development", "none"])
def test_the_vendors_model_is_not_served_without_the_vendors_license(tmp_path, license):
    folder = copied_cache_folder(tmp_path)
    config = a_license(tmp_path, signer=new_private_key()) if license == "development" else None
    with pytest.raises(ConfigError, match=f"vendor's model '{NAME}'.*license the vendor issued") \
            as e:
        claimed_identity(str(folder), "my-own-model", config)
    assert e.value.code == "model_not_licensed"


def test_a_development_servers_model_is_served_under_its_development_license(tmp_path):
    dev = new_private_key()
    folder = copied_cache_folder(tmp_path, signer=dev, model="dev-model")
    assert claimed_identity(str(folder), "x", a_license(tmp_path, signer=dev)) == "dev-model"


def test_an_identity_this_build_cannot_check_is_refused_not_ignored(tmp_path):
    folder = copied_cache_folder(tmp_path, signer=new_private_key())
    with pytest.raises(WeightsError, match="not a model identity this app can trust"):
        claimed_identity(str(folder), "x", a_license(tmp_path))
    (folder / ".identity").unlink()  # a deliberate act: the folder is then any local model
    assert claimed_identity(str(folder), "x", a_license(tmp_path)) == "x"
