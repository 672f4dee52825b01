"""Keys and leases the customer makes or alters.

A key signed by any key the build does not pin is a development license, whatever the
environment says: flagged in status and in every heartbeat, refused by the vendor's server (and
by any server that is not a development one), so it gets no lease and serves nothing. A lease
that was altered, expired, dated in the future, signed by another key or granted to another
license or cluster is refused by the actor (which keeps the lease before it) and by the gate.
"""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from pydantic import SecretStr, ValidationError

from license_contract import HeartbeatResponse, b64, unb64
from license_server.app import LicenseService
from license_server.db import LicenseStore
from license_server.limits import ServerPolicy
from license_server.signing import new_private_key, signer_of
from serve_app.config import Settings
from serve_app.licensing import LicenseConfig, LicenseGate, pinned_signers, read_license
from serve_app.licensing.ledger import UsageLedger
from tests.adversarial.site import DAY, HEARTBEAT_S, Site
from tests.fakes import VENDOR_KEY, Clocks, issue_key, issue_lease, serving_state

CUSTOMERS_OWN = new_private_key()  # what a customer with the package's source could make


def run(coro):
    return asyncio.run(coro)


def self_signed(clock: Clocks, **fields) -> str:
    """50 instances for 10 years, signed by the customer itself."""
    _, key = issue_key(CUSTOMERS_OWN, **{
        "issued_at": clock.t - 60, "expires_at": clock.t + 3650 * DAY, "max_instances": 50,
        "heartbeat_interval_s": HEARTBEAT_S, "grace_period_s": 10 * 3600.0, **fields})
    return key


def heartbeats(site: Site) -> list[dict]:
    return [json.loads(s.partition(b" ")[2]) for s in site.wire.sent
            if s.startswith(b"/v1/heartbeat")]


def test_a_self_signed_key_against_the_vendors_server_serves_nothing_and_says_development(
        tmp_path):
    async def scenario():
        site = Site(tmp_path)
        site.config = site.config.model_copy(update={"key": SecretStr(self_signed(site.clock))})
        await site.start()
        await site.run(12 * 3600)
        return site, await site.actor.status()

    site, status = run(scenario())
    assert {code for _, code in site.served} == {"license_pending"}
    assert status["development"] is True and status["lease_id"] is None
    assert "signed by a key this side does not trust" in status["last_error"]


@pytest.mark.parametrize("development_server", [False, True])
def test_a_self_signed_key_against_the_customers_own_server(tmp_path, development_server):
    """The customer runs a license server of its own with its own key. One that is not a
    development server refuses the development build's heartbeats: no lease, nothing served.
    A development server (what `make serve` runs) grants leases, and every heartbeat and the
    status say development: the vendor's server would refuse such a build."""
    clock = Clocks()
    store = LicenseStore(f"sqlite:///{tmp_path / 'own.db'}", now=clock).start()
    own = LicenseService(store, CUSTOMERS_OWN, "http://license.test", now=clock,
                         policy=ServerPolicy(accept_development=development_server))

    async def scenario():
        site = await Site(tmp_path, service=own, clock=clock).start()
        await site.run(6 * 3600)
        return site, await site.actor.status()

    site, status = run(scenario())
    assert status["development"] is True
    beats = heartbeats(site)
    assert beats and all(b["development"] is True for b in beats)
    if development_server:
        assert {code for _, code in site.served} == {None}
        assert site.actor._lease.development is True
    else:
        assert {code for _, code in site.served} == {"license_pending"}
        assert "development_build" in status["last_error"]


def test_a_vendor_key_serves_as_a_real_license(tmp_path):
    async def scenario():
        site = await Site(tmp_path).start()
        await site.run(3600)
        return site, await site.actor.status()

    site, status = run(scenario())
    assert status["development"] is False and {code for _, code in site.served} == {None}
    assert all(b["development"] is False for b in heartbeats(site))


def test_a_public_key_in_the_environment_is_not_read_and_the_key_stays_development(
        tmp_path, monkeypatch):
    """There is no public-key setting: the variable of older builds is not read (pydantic
    settings read only the fields they have), naming it anywhere else is refused, and a key
    signed by the customer's own key is a development license whatever the environment says."""
    clock = Clocks()
    key = self_signed(clock)
    monkeypatch.setenv("SERVE_APP_LICENSE_PUBLIC_KEY", signer_of(CUSTOMERS_OWN))
    monkeypatch.setenv("SERVE_APP_LICENSE_KEY", key)
    monkeypatch.setenv("SERVE_APP_LEDGER_PATH", str(tmp_path / "ledger.db"))
    config = Settings().to_app_config().license
    assert config is not None and set(config.model_dump()) == set(LicenseConfig.model_fields)
    for field in ("license_public_key", "public_key"):
        with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
            Settings(**{field: signer_of(CUSTOMERS_OWN)})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        LicenseConfig(key=SecretStr(key), ledger_path="x", public_key=signer_of(CUSTOMERS_OWN))
    assert signer_of(CUSTOMERS_OWN) not in pinned_signers()
    assert read_license(key, now=clock.t)[1] is True  # development
    assert read_license(issue_key(VENDOR_KEY)[1])[1] is False


# -- forged leases --------------------------------------------------------------------------------


def _resign_payload(text: str, change: dict) -> str:
    """The lease with ``change`` made to its payload and the original signature kept."""
    prefix, payload, signature = text.split(".")
    data = json.loads(unb64(payload))
    data.update(change)
    return ".".join((prefix, b64(json.dumps(data, sort_keys=True, separators=(",", ":"))
                                 .encode()), signature))


def forged(kind: str, *, license_id: str, cluster_id: str, now: float) -> str:
    good = dict(license_id=license_id, cluster_id=cluster_id, issued_at=now,
                expires_at=now + 30 * DAY)
    if kind == "tampered":  # more instances, the vendor's signature kept
        return _resign_payload(issue_lease(VENDOR_KEY, **good)[1], {"instances": 1000})
    if kind == "expired":
        return issue_lease(VENDOR_KEY, **{**good, "issued_at": now - 2 * DAY,
                                          "expires_at": now - DAY})[1]
    if kind == "future":
        return issue_lease(VENDOR_KEY, **{**good, "issued_at": now + DAY})[1]
    if kind == "wrong_key":
        return issue_lease(CUSTOMERS_OWN, **good)[1]
    if kind == "wrong_signer_named":  # names the vendor's key, signed by another
        lease = issue_lease(CUSTOMERS_OWN, **good)[1]
        prefix, payload, _ = lease.split(".")
        real = issue_lease(VENDOR_KEY, **good)[1].split(".")[2]
        return _resign_payload(f"{prefix}.{payload}.{real}", {"signer": signer_of(VENDOR_KEY)})
    if kind == "wrong_cluster":
        return issue_lease(VENDOR_KEY, **{**good, "cluster_id": "cl_someone_else"})[1]
    if kind == "wrong_license":
        return issue_lease(VENDOR_KEY, **{**good, "license_id": "lic_someone_else"})[1]
    if kind == "non_canonical":  # the same bytes spelt with padding
        prefix, payload, signature = issue_lease(VENDOR_KEY, **good)[1].split(".")
        padded = base64.urlsafe_b64encode(unb64(payload)).decode()
        return f"{prefix}.{padded}.{signature}" if padded != payload else f"{prefix}.{payload}="
    raise AssertionError(kind)


KINDS = {
    "tampered": "lease_invalid_signature", "expired": "lease_expired", "future": "lease_future",
    "wrong_key": "lease_untrusted_signer", "wrong_signer_named": "lease_invalid_signature",
    "wrong_cluster": "lease_wrong_cluster", "wrong_license": "lease_wrong_license",
    "non_canonical": "lease_malformed",
}


@pytest.mark.parametrize("kind", KINDS)
def test_the_gate_refuses_a_forged_lease(kind):
    clock = Clocks()
    state = serving_state(issued_at=clock.t, expires_at=clock.t + DAY)
    gate = LicenseGate(lambda: state, now=clock.mono)
    gate.state = state
    assert gate.refusal() is None
    bad = forged(kind, license_id=state["license_id"], cluster_id=state["cluster_id"],
                 now=clock.t)
    gate.state = {**state, "lease": bad, "server_now": clock.t}
    refusal = gate.refusal()
    assert (refusal["status"], refusal["code"]) == (503, "license_lease_invalid")
    assert KINDS[kind] in refusal["message"]
    gate.state = state  # the good one again
    assert gate.refusal() is None


@pytest.mark.parametrize("kind", KINDS)
def test_the_actor_refuses_a_forged_lease_and_keeps_the_one_before(tmp_path, kind):
    async def scenario():
        site = Site(tmp_path)
        ledger = UsageLedger(site.config.ledger_path).start()
        cluster_id = ledger.cluster_id()
        ledger.close()

        def answer():
            bad = forged(kind, license_id=site.license.license_id, cluster_id=cluster_id,
                         now=site.clock.t)
            return HeartbeatResponse(license_id=site.license.license_id, status="active",
                                     lease=bad)

        import httpx

        def script():
            site.wire.scripted["/v1/heartbeat"].append(httpx.Response(
                200, json=answer().model_dump(mode="json")))

        script()  # the first check-in brings a forged lease: nothing to serve under
        await site.start()
        first = site.refusal(), (await site.actor.state())["message"]
        await site.run(HEARTBEAT_S)  # a real one
        good = site.actor._lease.lease_id
        script()
        await site.run(HEARTBEAT_S)
        return site, first, good

    site, (refusal, message), good = run(scenario())
    assert refusal == "license_pending" and KINDS[kind] in message
    assert site.actor._lease.lease_id == good and site.refusal() is None
    assert KINDS[kind] in site.actor._last_error
