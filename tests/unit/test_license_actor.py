"""The license actor's logic as a plain object: injected clocks, the real license server app
behind an in-process transport that tests can cut or watch (``tests.fakes.LicenseWire``)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from pydantic import SecretStr

from license_server.app import IssueRequest, LicenseService, build_app
from license_server.db import LicenseStore
from serve_app.licensing import LicenseConfig
from serve_app.licensing.actor import LicenseActor
from serve_app.licensing.gate import LicenseGate
from tests.fakes import VENDOR_KEY, Clocks, LicenseWire, run_in_virtual_time


@pytest.fixture
def world(tmp_path):
    clock = Clocks()
    store = LicenseStore(f"sqlite:///{tmp_path / 'server.db'}", now=clock).start()
    service = LicenseService(store, VENDOR_KEY, "http://license.test", now=clock)
    network = LicenseWire(build_app(service, "admin"), server_now=clock)

    def make(**issue_kw):
        issue_kw.setdefault("models", ("*",))
        lic, key = service.issue(IssueRequest(customer="ACME", heartbeat_interval_s=10,
                                              grace_period_s=3600, **issue_kw))
        network.issued_at = lic.issued_at  # hold reports to the contract's interval rules
        config = LicenseConfig(key=SecretStr(key), ledger_path=str(tmp_path / "ledger.db"),
            report_interval_s=60)
        return lic, config

    def actor(config, key_override=None):
        if key_override:
            config = config.model_copy(update={"key": SecretStr(key_override)})
        return LicenseActor(config, now=clock.wall, monotonic=clock.mono, transport=network,
                            autostart=False)

    return clock, store, service, network, make, actor


def run(coro):
    return asyncio.run(coro)


def test_serves_reports_and_bills_exactly(world):
    clock, store, service, network, make, actor_of = world
    lic, config = make()
    actor = actor_of(config)
    assert run(actor.register("r1", "m", 1.0))["ok"]
    run(actor._tick())
    assert run(actor.state())["allowed"]
    for _ in range(6):
        clock.t += 10
        run(actor.heartbeat("r1", "m", 1.0))
    clock.t += 1
    totals = run(actor.flush())
    assert totals["instance_seconds"] == 60 and totals["pending_seconds"] == 0
    assert store.total_instance_seconds(lic.license_id) == 60
    status = run(actor.status())
    assert (status["instances_now"], status["license_id"], status["customer"]) == (
        1, lic.license_id, "ACME")
    assert store.active_instances(lic.license_id, fresh_s=1e9) == 1


def test_outage_grace_then_refusal_then_full_delivery(world):
    clock, store, service, network, make, actor_of = world
    lic, config = make()
    actor = actor_of(config)
    run(actor.register("r1", "m", 0.0))
    run(actor._tick())
    network.up = False
    for _ in range(359):  # 3590 s of outage: still inside the 1 h grace
        clock.t += 10
        run(actor.heartbeat("r1", "m", 0.0))
        with pytest.raises(httpx.ConnectError):
            run(actor._tick())
    assert run(actor.state())["allowed"]
    clock.t += 10
    run(actor.heartbeat("r1", "m", 0.0))
    state = run(actor.state())
    assert (state["allowed"], state["status"], state["code"]) == (False, 503,
                                                                   "license_checkin_overdue")
    assert run(actor.status())["seconds_pending_delivery"] == 3600
    network.up = True
    run(actor._tick())
    run(actor.flush())
    assert run(actor.state())["allowed"]
    assert store.total_instance_seconds(lic.license_id) == 3600  # every second, once


def test_actor_restart_resends_undelivered_report_once(world):
    clock, store, service, network, make, actor_of = world
    lic, config = make()
    actor = actor_of(config)
    run(actor.register("r1", "m", 0.0))
    clock.t += 30
    run(actor.heartbeat("r1", "m", 0.0))
    (report,) = actor._ledger.seal_reports()
    # Delivered, but the actor "died" before recording it.
    run(actor._client().post("/v1/usage", json={
        "cluster_id": actor._cluster_id, "report_id": report.report_id,
        "intervals": report.intervals}))
    actor._ledger.close()
    reborn = actor_of(config)
    assert reborn._cluster_id == actor._cluster_id
    run(reborn.flush())
    assert store.total_instance_seconds(lic.license_id) == 30
    assert reborn._ledger.pending_reports() == []


def test_revocation_expiry_and_invalid_keys(world):
    clock, store, service, network, make, actor_of = world
    lic, config = make(days=1)
    actor = actor_of(config)
    run(actor._tick())
    store.revoke(lic.license_id)
    run(actor._tick())
    assert (run(actor.state())["status"], run(actor.state())["code"]) == (403, "license_revoked")
    lic2, config2 = make(days=1)
    fresh = actor_of(config2)
    clock.t += 86400
    assert run(fresh.state())["code"] == "license_expired"
    broken = actor_of(config2, key_override=config2.key.get_secret_value()[:-8])
    state = run(broken.state())
    assert (state["status"], state["code"]) == (403, "license_invalid")
    assert "truncated" in state["message"] or "signature" in state["message"]
    assert not run(broken.register("r", "m", 0))["ok"]


def test_caps_and_entitlements(world):
    clock, store, service, network, make, actor_of = world
    lic, config = make(max_instances=2, models=("m",))
    actor = actor_of(config)
    assert run(actor.register("a", "m", 0))["ok"]
    assert run(actor.register("b", "m", 0))["ok"]
    refused = run(actor.register("c", "m", 0))
    assert not refused["ok"] and "cap" in refused["reason"]
    assert run(actor.register("a", "m", 0))["ok"]  # a running replica re-registering is fine
    assert "does not cover" in run(actor.register("d", "other", 0))["reason"]
    run(actor.deregister("b"))
    assert run(actor.register("c", "m", 0))["ok"]
    customer_cap = config.model_copy(update={"max_instances": 1,
                                             "ledger_path": config.ledger_path + "2"})
    small = actor_of(customer_cap)
    assert run(small.register("x", "m", 0))["ok"]
    assert not run(small.register("y", "m", 0))["ok"]


def test_dead_replica_stops_counting_within_two_intervals(world):
    clock, store, service, network, make, actor_of = world
    lic, config = make()
    actor = actor_of(config)
    run(actor.register("a", "m", 0))
    run(actor.register("b", "m", 0))
    clock.t += 10
    run(actor.heartbeat("a", "m", 0))
    clock.t += 10
    run(actor.heartbeat("a", "m", 0))  # b is silent for 2 intervals
    run(actor._tick())
    assert run(actor.status())["instances_now"] == 1


def test_reports_carry_no_prompt_data(world):
    clock, store, service, network, make, actor_of = world
    lic, config = make()
    actor = actor_of(config)
    run(actor.register("r1", "m", 1.0))
    clock.t += 10
    run(actor.heartbeat("r1", "m", 1.0))
    run(actor._tick())
    run(actor.flush())
    import json

    for sent in network.sent:
        path, _, body = sent.partition(b" ")
        if not body:
            continue
        keys = set(json.loads(body))
        assert keys <= {"cluster_id", "instances", "gpus", "development", "version", "stopping",
                        "report_id", "license_id", "intervals", "quarantined_reports",
                        "quarantined_seconds"}, keys
        for item in json.loads(body).get("intervals", []):
            assert set(item) == {"instance_id", "start", "end", "gpus"}


def test_gate_refuses_until_first_state_and_keeps_last_on_errors():
    calls = []

    async def fetch():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("actor restarting")
        return {"allowed": len(calls) < 3, "status": 403, "code": "license_revoked",
                "message": "revoked"}

    gate = LicenseGate(fetch, refresh_s=0.01)
    assert gate.refusal()["code"] == "license_pending"

    async def main():
        task = asyncio.create_task(gate.run())
        while len(calls) < 2:
            await asyncio.sleep(0.005)
        assert gate.refusal() is None  # the error kept the last (allowed) decision
        while len(calls) < 3:
            await asyncio.sleep(0.005)
        task.cancel()

    run_in_virtual_time(main())  # the gate's refreshes and this loop's checks, in order
    assert gate.refusal()["code"] == "license_revoked"


def test_gate_logs_an_unreadable_actor_at_once_then_once_a_minute_and_when_it_is_back():
    """Driven by a fake fetch and a fake sleep that advances the gate's clock: no waiting."""
    allowed = {"allowed": True, "status": 200, "code": "ok", "message": "ok"}
    # Up, down for 130 refreshes (one a second), up twice, down once, up.
    script = ["up"] + ["down"] * 130 + ["up", "up", "down", "up"]
    clock = [0.0]
    failures = [0]

    class Stop(Exception):
        pass

    async def fetch():
        if script.pop(0) == "up":
            return allowed
        failures[0] += 1
        raise RuntimeError(f"actor down {failures[0]}")

    async def sleep(seconds):
        if not script:
            raise Stop
        clock[0] += seconds

    gate = LicenseGate(fetch, refresh_s=1.0, sleep=sleep, now=lambda: clock[0])
    records = _records_of("ray.serve", lambda: asyncio.run(gate.run()), Stop)
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("WARNING", "Reading the license state failed: RuntimeError('actor down 1')"),
        ("WARNING", "Reading the license state still fails (60 more in 60 s): "
                    "RuntimeError('actor down 61')"),
        ("WARNING", "Reading the license state still fails (60 more in 60 s): "
                    "RuntimeError('actor down 121')"),
        ("INFO", "Reading the license state works again after 130 failures in 130 s"),
        ("WARNING", "Reading the license state failed: RuntimeError('actor down 131')"),
        ("INFO", "Reading the license state works again after 1 failure in 1 s"),
    ]
    assert records[0].exc_info is not None  # the first says where it failed
    assert gate.state == allowed


def _records_of(name, run, stop):
    """What logger ``name`` emits, at INFO and above, while ``run()`` runs until it raises
    ``stop``."""
    import logging

    records = []

    class Collect(logging.Handler):  # the logger's own handler: whether it propagates or not
        def emit(self, record):
            records.append(record)

    handler = Collect()
    logger = logging.getLogger(name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.raises(stop):
            run()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return records


def test_status_shows_the_usage_of_the_license_in_force(world):
    clock, store, service, network, make, actor_of = world
    lic, config = make()
    first = actor_of(config)
    run(first.register("r1", "m", 0.0))
    run(first._tick())
    clock.t += 100
    run(first.deregister("r1"))
    run(first.flush())
    assert run(first.status())["instance_seconds_total"] == 100
    first._ledger.close()
    lic2, config2 = make()  # a new key on the same cluster, same ledger
    network.issued_at = min(lic.issued_at, lic2.issued_at)
    second = actor_of(config2)
    run(second.register("r2", "m", 0.0))
    run(second._tick())
    clock.t += 30
    run(second.heartbeat("r2", "m", 0.0))
    assert run(second.status())["instance_seconds_total"] == 30
    run(second.flush())
    status = run(second.status())
    assert (status["license_id"], status["instance_seconds_total"]) == (lic2.license_id, 30)
    assert store.total_instance_seconds(lic.license_id) == 100
    assert store.total_instance_seconds(lic2.license_id) == 30
