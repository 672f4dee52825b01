"""The vendor's license server through TestClient, on SQLite and (when configured) PostgreSQL."""

from __future__ import annotations

import csv
import io
import os
import stat
import uuid

import pytest
from starlette.testclient import TestClient

from license_contract import verify_key
from license_server.app import LicenseService, build_app
from license_server.cli import LicenseServerSettings, build_service, main
from license_server.db import Interval, LicenseStore, split_by_day
from license_server.signing import new_private_key
from tests.conftest import missing
from tests.fakes import BEAT, VENDOR_KEY

DAY = 86400.0
ADMIN_TOKEN = "admin-token-of-the-unit-tests-0123456789"
T0 = 1_800_000_000.0 - (1_800_000_000.0 % DAY)  # a UTC midnight


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def database_urls() -> list:
    pg = os.environ.get("TEST_POSTGRES_URL") or "missing"
    return [pytest.param("sqlite", id="sqlite"), pytest.param(pg, id="postgresql")]


def database_url(param: str, tmp_path) -> str:
    """The URL for a ``database_urls`` param: a fresh SQLite file, or the PostgreSQL server
    (skipped without one, except in CI, where .ci/run starts it and a missing URL fails)."""
    if param == "sqlite":
        return f"sqlite:///{tmp_path / 'licenses.db'}"
    if param == "missing":
        missing("PostgreSQL (TEST_POSTGRES_URL)", ".ci/run starts it and sets TEST_POSTGRES_URL")
    return param


def reset_database(engine) -> None:
    """Empty tables of this version's schema, whatever an earlier run left (tables it no
    longer has included: they may hold foreign keys to this one's)."""
    import sqlalchemy as sa

    from license_server.db import metadata

    found = sa.MetaData()
    found.reflect(engine)
    found.drop_all(engine)
    metadata.create_all(engine)


@pytest.fixture(params=database_urls())
def store(request, tmp_path):
    url = database_url(request.param, tmp_path)
    clock = Clock(T0 + 3600)
    s = LicenseStore(url, now=clock).start()
    if url.startswith("postgresql"):  # a shared server: start each test from empty tables
        reset_database(s.engine)
    s.clock = clock
    yield s
    s.engine.dispose()


@pytest.fixture
def server(store):
    service = LicenseService(store, VENDOR_KEY, "http://license.test", now=store.clock)
    client = TestClient(build_app(service, admin_token=ADMIN_TOKEN))
    client.service = service
    return client


ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def issue(server, **kw):
    resp = server.post("/admin/licenses", json={"customer": "ACME", "days": 30, "models": ["*"], **kw},
                       headers=ADMIN)
    assert resp.status_code == 201, resp.text
    return resp.json()


def as_client(key):
    return {"Authorization": f"Bearer {key}"}


def test_issue_verify_and_list(server):
    issued = issue(server, max_instances=4, models=["m1"])
    public = server.get("/v1/public-key").json()["public_key"]
    lic = verify_key(issued["key"], signers={public}, now=T0 + 3600)
    assert (lic.customer, lic.max_instances, lic.models) == ("ACME", 4, ("m1",))
    assert lic.server_url == "http://license.test"
    listed = server.get("/admin/licenses", headers=ADMIN).json()["licenses"]
    assert [r["license_id"] for r in listed] == [lic.license_id]
    assert "key" not in listed[0]


def test_admin_routes_need_the_token(server):
    for method, path in [("POST", "/admin/licenses"), ("GET", "/admin/licenses"),
                         ("POST", "/admin/licenses/x/revoke"), ("GET", "/admin/usage")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            resp = server.request(method, path, json={"customer": "x"}, headers=headers)
            assert resp.status_code == 401
            assert resp.json()["error"]["code"] == "unauthorized"


def test_client_routes_need_a_valid_key(server):
    issue(server)
    foreign = LicenseService(server.service.store, new_private_key(), "x")
    from license_server.app import IssueRequest

    _, other_key = foreign.issue(IssueRequest(models=("*",), customer="evil"))
    for headers in ({}, as_client("garbage"), as_client(other_key)):
        resp = server.post("/v1/heartbeat", json={**BEAT, "cluster_id": "c", "instances": 1},
                           headers=headers)
        assert resp.status_code == 401, resp.text


def test_activation_heartbeat_status_and_revocation(server):
    key = issue(server)["key"]
    assert server.post("/v1/activate", json={"cluster_id": "c1"},
                       headers=as_client(key)).json()["status"] == "active"
    assert server.post("/v1/heartbeat", json={**BEAT, "cluster_id": "c1", "instances": 3},
                       headers=as_client(key)).json()["status"] == "active"
    lid = server.get("/v1/status", headers=as_client(key)).json()["license_id"]
    assert server.service.store.active_instances(lid, fresh_s=90) == 3
    assert server.post(f"/admin/licenses/{lid}/revoke", headers=ADMIN).status_code == 200
    assert server.get("/v1/status", headers=as_client(key)).json()["status"] == "revoked"
    assert server.post("/admin/licenses/nope/revoke", headers=ADMIN).status_code == 404
    server.service.store.clock.t += 31 * DAY
    assert server.get("/v1/status", headers=as_client(key)).json()["status"] == "expired"


def test_usage_reports_are_idempotent(server):
    server.service.store.clock.t = T0 - 3600
    key = issue(server)["key"]
    server.service.store.clock.t = T0 + 3600
    report = {"cluster_id": "c1", "report_id": uuid.uuid4().hex,
              "intervals": [{"instance_id": "r1", "start": T0, "end": T0 + 100, "gpus": 1},
                            {"instance_id": "r2", "start": T0, "end": T0 + 50, "gpus": 2}]}
    first = server.post("/v1/usage", json=report, headers=as_client(key)).json()
    again = server.post("/v1/usage", json=report, headers=as_client(key)).json()
    assert (first["duplicate"], again["duplicate"]) == (False, True)
    lid = server.get("/v1/status", headers=as_client(key)).json()["license_id"]
    assert server.service.store.total_instance_seconds(lid) == 150
    bad = {**report, "report_id": uuid.uuid4().hex,
           "intervals": [{"instance_id": "r1", "start": 10, "end": 5}]}
    assert server.post("/v1/usage", json=bad, headers=as_client(key)).status_code == 400
    assert server.post("/v1/usage", json={"cluster_id": "c"},
                       headers=as_client(key)).status_code == 400
    assert server.service.store.total_instance_seconds(lid) == 150


def test_usage_per_day_json_and_csv(server):
    server.service.store.clock.t = T0 - 7200
    key = issue(server)["key"]
    server.service.store.clock.t = T0 + 6000
    lid = server.get("/v1/status", headers=as_client(key)).json()["license_id"]
    crossing = [{"instance_id": "r1", "start": T0 - 1800, "end": T0 + 5400, "gpus": 1}]
    server.post("/v1/usage", json={"cluster_id": "c", "report_id": "rep-00001",
                                   "intervals": crossing}, headers=as_client(key))
    server.post("/v1/heartbeat", json={**BEAT, "cluster_id": "c", "instances": 2}, headers=as_client(key))
    rows = server.get(f"/admin/usage?license_id={lid}", headers=ADMIN).json()["usage"]
    assert [(r["instance_seconds"], r["active_instances_now"]) for r in rows] == [(1800, 2),
                                                                               (5400, 2)]
    assert rows[1]["instance_hours"] == 1.5
    text = server.get("/admin/usage?format=csv", headers=ADMIN).text
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert [float(r["instance_seconds"]) for r in parsed] == [1800, 5400]


def test_split_by_day():
    days = split_by_day([Interval("a", T0 - 10, T0 + DAY + 10, gpus=2)])
    assert [v["instance_seconds"] for v in days.values()] == [10, DAY, 10]
    assert sum(v["gpu_seconds"] for v in days.values()) == 2 * (DAY + 20)


def test_the_database_keeps_the_keys_hash_and_fields_never_the_key(server):
    import hashlib

    import sqlalchemy as sa

    from license_contract import License
    from license_server.signing import sign_license

    issued = issue(server, max_instances=4, max_gpus=8)
    key, lid = issued["key"], issued["license"]["license_id"]
    with server.service.store.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.text("SELECT * FROM licenses"))]
    (row,) = rows
    assert key not in repr(rows) and key.split(".")[2] not in repr(rows)
    assert row["key_sha256"] == hashlib.sha256(key.encode()).hexdigest()
    assert License.model_validate_json(row["payload"]) == verify_key(key, now=T0 + 3600)
    assert server.get("/v1/status", headers=as_client(key)).json()["status"] == "active"
    # A second document under the same id, even one this server's key signed, is not the key
    # it issued.
    other = sign_license(verify_key(key, now=T0 + 3600).model_copy(update={"max_instances": 99}),
                         VENDOR_KEY)
    resp = server.get("/v1/status", headers=as_client(other))
    assert (resp.status_code, resp.json()["error"]["code"]) == (401, "license_unknown")
    # Usage pages read the stored fields.
    server.post("/v1/heartbeat", json={**BEAT, "cluster_id": "c", "instances": 5, "gpus": 9},
                headers=as_client(key))
    (day,) = server.get(f"/admin/usage?license_id={lid}", headers=ADMIN).json()["usage"]
    assert {"over_cap_heartbeat", "over_cap_gpus_heartbeat"} <= {f["code"] for f in day["flags"]}


def test_admin_tokens_shorter_than_32_characters_are_refused_at_start(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="at least 32 characters"):
        LicenseServerSettings(data_dir=str(tmp_path), admin_token="short-token")
    (tmp_path / "ls").mkdir()
    (tmp_path / "ls" / "admin_token").write_text("x" * 31)
    with pytest.raises(ValueError, match="shorter than 32 characters"):
        build_service(LicenseServerSettings(data_dir=str(tmp_path / "ls")))


def test_cli_creates_a_private_signing_key_and_issues(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LICENSE_SERVER_DATA_DIR", str(tmp_path / "ls"))
    main(["issue", "--customer", "ACME", "--days", "1", "--models", "*", "--max-instances", "2",
          "--json"])
    import json

    out = json.loads(capsys.readouterr().out)
    data = tmp_path / "ls"
    # Owner only: the folder, and every file in it (SQLite's -wal and -shm included).
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    files = {f.name: stat.S_IMODE(f.stat().st_mode) for f in data.iterdir()}
    assert {"vendor_signing_key.pem", "admin_token", "licenses.db"} <= set(files)
    assert set(files.values()) == {0o600}, files
    lic = verify_key(out["key"], signers={out["public_key"]})
    assert lic.max_instances == 2
    main(["list"])
    assert lic.license_id in capsys.readouterr().out
    main(["revoke", lic.license_id])
    service, _ = build_service(LicenseServerSettings())
    assert service.store.get_license(lic.license_id)["revoked_at"] is not None
    main(["usage", "--format", "csv"])
    assert capsys.readouterr().out.splitlines()[-1].startswith("license_id,day")
