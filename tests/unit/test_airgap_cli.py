"""Air-gapped licensing through the two products' own commands, as the guide walks it
(deploy/air-gapped.md), and what the running app says about it (status, /license, the log)."""

from __future__ import annotations

import asyncio
import json
import logging
import stat

import pytest
from pydantic import SecretStr

from license_server.cli import main as vendor
from serve_app.cli import main as customer
from serve_app.licensing import LicenseConfig
from serve_app.licensing.actor import LicenseActor
from serve_app.licensing.cli import format_status
from serve_app.licensing.ledger import UsageLedger
from tests.adversarial.airgap_site import DAY, AirGapSite


def run_customer(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        customer(argv)
    out = capsys.readouterr()
    assert info.value.code == 0, out.err
    return out.out


def run_vendor(argv: list[str], capsys) -> str:
    vendor(argv)
    return capsys.readouterr().out


def test_request_activate_import_export_import_usage_renew(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LICENSE_SERVER_DATA_DIR", str(tmp_path / "vendor"))
    issued = json.loads(run_vendor(["issue", "--customer", "Bank", "--models", "*",
                                    "--air-gapped", "--grace-hours", "720", "--json"], capsys))
    assert issued["license"]["air_gapped"] is True
    ledger = tmp_path / "head" / "ledger.db"
    monkeypatch.setenv("SERVE_APP_LICENSE_KEY", issued["key"])
    monkeypatch.setenv("SERVE_APP_LEDGER_PATH", str(ledger))

    request = tmp_path / "request.json"
    request.write_text(run_customer(["license", "request", "--instances", "2"], capsys))
    summary = json.loads(request.read_text())
    assert summary["license_id"] == issued["license"]["license_id"]
    assert summary["instances"] == 2 and issued["key"] not in request.read_text()
    key_file = ledger.parent / "installation_key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    lease = tmp_path / "lease.json"
    lease.write_text(run_vendor(["activate", str(request)], capsys))
    assert "imported" in run_customer(["license", "import", str(lease)], capsys)

    # What a running app logs (the actor's part is in tests/adversarial/test_airgap.py).
    store = UsageLedger(ledger).start()
    cluster = store.cluster_id()
    for kind in ("start", "beat", "stop"):
        store.log_event(kind, summary["license_id"], cluster, instances=0, gpus=0.0)
    store.close()
    assert "0 delivered reports and 3 beat, start and stop entries, chain intact" in \
        run_customer(["usage-log", "verify"], capsys)
    bundle = tmp_path / "bundle.json"
    bundle.write_text(run_customer(["usage-log", "export"], capsys))
    assert json.loads(bundle.read_text())["entries"] == {"start": 1, "beat": 1, "stop": 1}
    renewal = tmp_path / "renewal.json"
    renewal.write_text(run_vendor(["import-usage", str(bundle)], capsys))
    assert json.loads(renewal.read_text())["acknowledged_head"] == json.loads(
        bundle.read_text())["head"]
    run_customer(["license", "import", str(renewal)], capsys)
    # Nothing is waiting now: the next bundle is empty and chains on from the renewal's head.
    assert json.loads(run_customer(["usage-log", "export"], capsys))["entries"] == {}
    listed = run_vendor(["installations", summary["license_id"]], capsys)
    assert cluster in listed and "bundles=1" in listed and "OVERDUE" not in listed

    # An older lease is refused once a newer one is imported; a broken bundle says why.
    with pytest.raises(SystemExit) as info:
        customer(["license", "import", str(lease)])
    assert info.value.code == 1
    assert "before the one imported already" in capsys.readouterr().err
    text = bundle.read_text().replace('"bundle": "MTLB1.', '"bundle": "MTLB1.x')
    bundle.write_text(text)
    with pytest.raises(SystemExit, match="refused"):
        vendor(["import-usage", str(bundle)])


def test_an_online_license_makes_no_activation_request(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LICENSE_SERVER_DATA_DIR", str(tmp_path / "vendor"))
    issued = json.loads(run_vendor(["issue", "--customer", "ACME", "--models", "*", "--json"],
                                   capsys))
    monkeypatch.setenv("SERVE_APP_LICENSE_KEY", issued["key"])
    monkeypatch.setenv("SERVE_APP_LEDGER_PATH", str(tmp_path / "ledger.db"))
    with pytest.raises(SystemExit) as info:
        customer(["license", "request"])
    assert info.value.code == 1
    assert "not an air-gapped license" in capsys.readouterr().err


def test_status_says_air_gapped_and_what_waits_and_warns_a_week_before_expiry(tmp_path, caplog):
    async def scenario():
        site = await AirGapSite(tmp_path).start()
        site.take(site.activate(site.request()))
        await site.run(20 * DAY)
        early = await site.actor.status()
        with caplog.at_level(logging.WARNING, logger="ray.serve"):
            await site.run(4 * DAY)  # the lease (30 days) has less than 7 left
        late = await site.actor.status()
        return early, late

    early, late = asyncio.run(scenario())
    assert early["air_gapped"] is True and early["state"] == "ok"
    assert "never dials" in early["mode"]
    assert early["usage_days_waiting"] == pytest.approx(20, abs=0.1)
    assert early["usage_entries_waiting"] > 20 * 24
    assert early["lease_warning"] is None
    assert "expires at" in late["lease_warning"] and "in 6.0 days" in late["lease_warning"]
    warned = [r.getMessage() for r in caplog.records if "air-gapped lease expires" in
              r.getMessage()]
    assert warned  # once a day, not at every beat
    assert len(warned) <= 2
    lines = format_status(late).splitlines()
    assert lines[0].startswith("AIR-GAPPED") and lines[1].startswith("WARNING: the air-gapped")


def test_an_air_gapped_actor_without_a_lease_says_how_to_get_one(tmp_path):
    site = AirGapSite(tmp_path)

    async def scenario():
        actor = LicenseActor(LicenseConfig(key=SecretStr(site.key),
                                           ledger_path=str(tmp_path / "l.db")),
                             now=site.clock.wall, monotonic=site.clock.mono,
                             transport=site.network, autostart=False)
        await actor._step()
        return await actor.state()

    state = asyncio.run(scenario())
    assert state["code"] == "license_airgap_no_lease" and state["status"] == 503
    assert "license request" in state["message"] and site.network.requests == []


def test_the_privacy_canary_through_every_route_is_in_no_bundle(tmp_path):
    """Every route served under an air-gapped lease with the canary in its prompt, query,
    model name and request id: the bundle (and the ledger it is made from) holds none of it."""
    import uuid

    from starlette.testclient import TestClient

    from serve_app.config import AppConfig, ModelConfig
    from serve_app.ingress import build_ingress
    from serve_app.licensing.gate import LicenseGate
    from tests.e2e.privacy import MODEL, canary_requests
    from tests.fakes import FakeLLMHandle, FakeLLMServer

    canary = f"CANARY-{uuid.uuid4().hex}"

    async def serving():
        site = await AirGapSite(tmp_path).start()
        site.take(site.activate(site.request()))
        await site.run(3600)
        return site, await site.actor.state(), await site.actor.status()

    site, state, status = asyncio.run(serving())
    assert state["allowed"]

    async def fetch():  # the actor's state as the gate last read it
        return state

    async def license_status():
        return status

    gate = LicenseGate(fetch, refresh_s=3600)
    app = build_ingress(AppConfig(models=(ModelConfig(name=MODEL, device="cpu"),)),
                        {MODEL: FakeLLMHandle(FakeLLMServer(MODEL))}, license_gate=gate,
                        license_status=license_status)
    with TestClient(app) as c:
        gate.state = state
        for method, path, body, expected in canary_requests(canary):
            kw = {"content": body} if isinstance(body, bytes) else {"json": body}
            resp = c.request(method, path, headers={"X-Request-Id": canary}, **kw)
            assert resp.status_code == expected, (path, resp.text)

    async def carry():
        await site.run(3600)
        await site.stop()
        return site.export()

    bundle = asyncio.run(carry())
    assert json.loads(bundle)["entries"]["report"] >= 1
    from license_contract import read_bundle, signed_in_file

    opened = read_bundle(signed_in_file(bundle, "bundle"))  # the signed payload, decoded
    assert canary not in bundle and canary not in opened.model_dump_json()
    for path in (tmp_path / "head").iterdir():
        assert canary.encode() not in path.read_bytes()
