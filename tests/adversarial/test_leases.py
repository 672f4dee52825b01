"""Serving stops when the lease runs out, whatever the customer does to the license actor, the
ledger or the clock: each scenario over simulated hours (``site.Site``). The lease lives for the
grace period (4 h here) from the last check-in the vendor saw; an honest customer under the same
clock serves throughout and raises no flag."""

from __future__ import annotations

import asyncio

import pytest

from tests.adversarial.site import DAY, GRACE_S, HEARTBEAT_S, Site


def run(coro):
    return asyncio.run(coro)


def test_an_honest_customer_serves_throughout_and_raises_no_flag(tmp_path):
    async def scenario():
        site = await Site(tmp_path).start()
        await site.run(12 * 3600)  # as long as the longest scenario here
        await site.actor.flush()
        return site

    site = run(scenario())
    assert {code for _, code in site.served} == {None}
    assert site.flags() == []
    assert site.service.store.total_instance_seconds(site.license.license_id) == pytest.approx(
        2 * 12 * 3600, abs=1)


def test_an_honest_outage_serves_for_the_grace_period_then_resumes(tmp_path):
    async def scenario():
        site = await Site(tmp_path).start()
        await site.run(3600)
        expiry = site.lease_expiry()
        site.cut_network()
        await site.run(6 * 3600)
        site.wire.up = True
        await site.run(HEARTBEAT_S)
        return site, expiry

    site, expiry = run(scenario())
    assert site.stopped_serving_at() is None  # served again once the server was back
    assert expiry == pytest.approx(3600 + GRACE_S + site.served[0][0] - HEARTBEAT_S, abs=1)
    refused = [t for t, code in site.served if code is not None]
    assert refused[0] == pytest.approx(expiry, abs=HEARTBEAT_S)
    assert {code for t, code in site.served if expiry <= t < site.served[-1][0]} == {
        "license_checkin_overdue"}


def test_a_killed_actor_stops_serving_at_lease_expiry_not_before_and_not_never(tmp_path):
    async def scenario():
        site = await Site(tmp_path).start()
        await site.run(2 * 3600)
        expiry = site.lease_expiry()  # of the check-in at 2 h
        site.kill_actor()
        await site.run(expiry - 1 - site.clock.t)
        just_before = site.refusal()
        site.clock.advance(1)  # the gate reads its monotonic clock: no refresh needed
        at_expiry = site.refusal()
        await site.run(10 * 3600)
        return site, expiry, just_before, at_expiry

    site, expiry, just_before, at_expiry = run(scenario())
    assert just_before is None and at_expiry == "license_lease_expired"
    assert {code for t, code in site.served if t < expiry} == {None}
    assert {code for t, code in site.served if t >= expiry} == {"license_lease_expired"}


def test_a_deleted_ledger_serves_nothing_until_the_vendor_sees_a_check_in(tmp_path):
    """The grace period does not start again: without the ledger there is no lease, and a new
    one comes only from a check-in, which the vendor sees (as a new cluster)."""
    async def scenario():
        site = await Site(tmp_path).start()
        await site.run(3600)
        site.cut_network()
        site.delete_ledger()
        await site.restart_actor()  # Ray restarts it; the ingress's gate lives on
        offline = site.refusal()
        await site.run(8 * 3600)
        site.wire.up = True
        await site.run(HEARTBEAT_S)
        return site, offline

    site, offline = run(scenario())
    assert offline == "license_pending"
    start_offline = 3600 + site.served[0][0] - HEARTBEAT_S
    assert {code for t, code in site.served if start_offline < t < site.served[-1][0]} == {
        "license_pending"}
    assert site.refusal() is None  # served again after the check-in
    assert len(site.service.store.clusters_of(site.license.license_id)) == 2


def test_a_clock_set_back_by_days_and_a_restart_stop_at_the_leases_expiry(tmp_path):
    async def scenario():
        site = await Site(tmp_path).start()
        await site.run(3600)
        expiry = site.lease_expiry()
        site.cut_network()
        site.set_wall_clock_back(3 * DAY)
        await site.run(3600)
        site.stop()
        await site.start()  # the same boot: the monotonic clock carries on
        await site.run(8 * 3600)
        return site, expiry

    site, expiry = run(scenario())
    assert site.stopped_serving_at() == pytest.approx(expiry, abs=HEARTBEAT_S)
    assert {code for t, code in site.served if t >= expiry} == {"license_checkin_overdue"}


def test_a_clock_set_back_by_days_and_a_reboot_serve_no_longer_than_the_leases_life(tmp_path):
    """After a reboot the monotonic clock starts over and the wall clock says three days ago:
    the server's time starts from the latest one the ledger saw, so the lease serves the rest of
    its life in running time (the time the host was down does not count for it), and then
    stops."""
    down = 600.0

    async def scenario():
        site = await Site(tmp_path).start()
        await site.run(3600)
        checked_in, expiry = site.clock.t, site.lease_expiry()
        site.cut_network()
        await site.run(2 * 3600)
        site.set_wall_clock_back(3 * DAY)
        site.reboot(down)
        await site.start()
        await site.run(8 * 3600)
        return site, checked_in, expiry

    site, checked_in, expiry = run(scenario())
    stopped = site.stopped_serving_at()
    # Served from the check-in for the lease's life, plus at most one heartbeat interval (the
    # ledger's floor of the server's time is saved at each tick).
    running = stopped - checked_in - down
    assert expiry - checked_in == pytest.approx(GRACE_S, abs=1)
    assert GRACE_S - HEARTBEAT_S <= running <= GRACE_S + HEARTBEAT_S
    assert {code for t, code in site.served if t >= stopped} == {"license_checkin_overdue"}
