"""An air-gapped installation over 90 simulated days (``airgap_site.AirGapSite``): activated by
file, serving under leases carried by hand, its usage billed once from bundles; and the bundles
a customer might forge or break, each refused with its reason."""

from __future__ import annotations

import asyncio
import json

import pytest

from license_contract import GENESIS
from license_server.billing import Refusal
from tests.adversarial.airgap_site import DAY, LEASE_S, AirGapSite
from tests.unit.test_license_server import database_url, database_urls


def run(coro):
    return asyncio.run(coro)


BEAT_S = 3 * 3600.0


def assert_books_agree(site: AirGapSite) -> None:
    assert site.vendor_seconds() == pytest.approx(site.customer_log_seconds(), abs=1e-3)
    assert site.vendor_days() == pytest.approx(site.customer_days(), abs=1e-3)


def test_ninety_days_activate_serve_export_import_renew_lapse_and_resume(tmp_path):
    async def scenario():
        # A beat every 3 h keeps 90 days to 720 steps.
        site = await AirGapSite(tmp_path, heartbeat_s=BEAT_S).start()
        assert site.refusal() == "license_airgap_no_lease"
        site.take(site.activate(site.request()))
        await site.beat()
        assert site.refusal() is None
        await site.run(25 * DAY)
        await site.renew()  # day 25: the lease runs to day 55
        assert_books_agree(site)
        await site.run(25 * DAY)
        renewal = await site.renew()  # day 50: to day 80
        assert_books_agree(site)
        expiry = json.loads(renewal)["expires_at"]
        await site.run(35 * DAY)  # no bundle carried: the lease lapses at day 80
        lapsed = site.refusal()
        message = site.gate.refusal()["message"]
        overdue = [f for f in site.flags() if f["code"] == "bundle_overdue"]
        await site.renew()  # day 85: serving resumes at once
        resumed = site.refusal()
        await site.run(5 * DAY)
        await site.stop()
        site.import_usage(site.export())
        return site, lapsed, message, overdue, resumed, expiry

    site, lapsed, message, overdue, resumed, expiry = run(scenario())
    assert site.network.requests == []  # never dialled
    assert lapsed == "license_airgap_lease_expired"
    assert "usage-log export" in message and "license import" in message
    start = site.served[0][0] - BEAT_S
    lapse_at = start + 50 * DAY + LEASE_S
    assert {code for t, code in site.served if t < lapse_at - BEAT_S} == {None}
    assert {code for t, code in site.served if lapse_at + BEAT_S <= t < start + 85 * DAY} \
        == {"license_airgap_lease_expired"}
    assert resumed is None
    assert {code for t, code in site.served if t > start + 85 * DAY + 1} == {None}
    # The vendor saw the installation fall overdue, in the cross-check's flag shape.
    (flag,) = overdue
    assert flag["cluster_id"] and flag["day"] and flag["evidence"]["overdue_s"] > 4 * DAY
    assert site.flags() == []  # honest throughout, once renewed
    assert_books_agree(site)
    # Two replicas for 90 days, billed to the second (a lapse stops new requests, not replicas).
    assert site.vendor_seconds() == pytest.approx(2 * 90 * DAY, abs=2 * BEAT_S)
    view = site.desk.installations(site.license.license_id)["installations"]
    assert view[0]["bundles"] == 4 and not view[0]["overdue"]


def test_a_replayed_bundle_bills_nothing_twice_and_gets_the_same_answer(tmp_path):
    async def scenario():
        site = await AirGapSite(tmp_path).start()
        site.take(site.activate(site.request()))
        await site.run(2 * DAY)
        bundle = site.export()
        first = site.import_usage(bundle)
        billed = site.vendor_seconds()
        again = site.import_usage(bundle)
        site.take(first)
        await site.run(DAY)
        later = site.export()
        site.import_usage(later)
        return site, first, again, billed, bundle

    site, first, again, billed, bundle = run(scenario())
    assert again == first and billed > 0
    assert site.import_usage(bundle) != first  # the latest lease now, still billing nothing
    assert_books_agree(site)


def test_the_same_activation_asked_twice_gets_the_same_lease(tmp_path):
    async def scenario():
        site = await AirGapSite(tmp_path).start()
        request = site.request()
        return site, site.activate(request), site.activate(request)

    _, one, two = run(scenario())
    assert one == two


@pytest.fixture
def honest(tmp_path):
    """An activated installation with two days of usage exported (and not imported)."""
    async def scenario():
        site = await AirGapSite(tmp_path).start()
        site.take(site.activate(site.request()))
        await site.run(2 * DAY)
        return site

    return run(scenario())


def _resign(site: AirGapSite, bundle_file: str, **changes) -> str:
    from license_contract import bundle_text, canonical, file_text, read_bundle, signed_in_file
    from serve_app.licensing import airgap

    bundle = read_bundle(signed_in_file(bundle_file, "bundle"))
    doc = bundle.model_copy(update=changes)
    key = airgap.installation_key(site.ledger_path)
    return file_text("bundle", bundle_text(doc, key.sign(canonical(doc))))


def _refused(site: AirGapSite, bundle_file: str) -> str:
    with pytest.raises(Refusal) as info:
        site.import_usage(bundle_file)
    return info.value.code


def test_a_bundle_with_an_entry_removed_is_refused_and_bills_nothing(honest):
    bundle = honest.export()
    entries = json.loads(bundle)  # the summary says what is in it
    assert entries["entries"]["report"] > 10
    from license_contract import read_bundle, signed_in_file

    texts = read_bundle(signed_in_file(bundle, "bundle")).entries
    removed = texts[:5] + texts[6:]
    assert _refused(honest, _resign(honest, bundle, entries=removed)) == "bundle_chain_broken"
    reordered = texts[:5] + (texts[6], texts[5]) + texts[7:]
    assert _refused(honest, _resign(honest, bundle, entries=reordered)) == "bundle_chain_broken"
    altered = list(texts)
    n = next(n for n, t in enumerate(texts) if n > 5 and '"kind":"beat"' in t)
    altered[n] = altered[n].replace('"instances":2', '"instances":1')  # fewer replicas said
    assert altered[n] != texts[n]
    assert _refused(honest, _resign(honest, bundle, entries=tuple(altered))) \
        == "bundle_chain_broken"
    assert honest.vendor_seconds() == 0.0


def test_a_bundle_that_does_not_chain_on_from_the_last_one_is_refused(honest):
    async def more():
        honest.take(honest.import_usage(honest.export()))
        await honest.run(DAY)

    first = honest.export()
    run(more())
    # The first bundle's entries again, claiming to follow the acknowledged head: a gap.
    from license_contract import read_bundle, signed_in_file

    second = honest.export()
    head = read_bundle(signed_in_file(second, "bundle")).previous_head
    assert head != GENESIS
    skipped = _resign(honest, second, previous_head="f" * 64)
    assert _refused(honest, skipped) == "bundle_chain_broken"
    # A bundle that starts after an entry the vendor never acknowledged (one export skipped).
    texts = read_bundle(signed_in_file(second, "bundle")).entries
    from license_contract import entry_hash

    later = _resign(honest, second, previous_head=entry_hash(texts[3]), entries=texts[4:])
    assert _refused(honest, later) == "bundle_chain_broken"
    assert first  # the honest first bundle was billed: the rest is refused on top of it
    honest.import_usage(second)
    assert_books_agree(honest)


def test_a_bundle_from_another_installation_is_refused(honest):
    from license_contract import bundle_text, canonical, file_text, read_bundle, signed_in_file
    from license_contract.signed import public_key_text
    from license_server.signing import new_private_key

    # Signed by a key that is not the installation's (another head node's), naming it.
    bundle = read_bundle(signed_in_file(honest.export(), "bundle"))
    key = new_private_key()
    doc = bundle.model_copy(update={"signer": public_key_text(key.public_key())})
    forged = file_text("bundle", bundle_text(doc, key.sign(canonical(doc))))
    assert _refused(honest, forged) == "bundle_other_installation"
    # This installation's entries, signed by its key, carried as another installation's.
    assert _refused(honest, _resign(honest, honest.export(), installation_id="cl_elsewhere")) \
        == "installation_unknown"
    assert honest.vendor_seconds() == 0.0


def _codes(site: AirGapSite) -> set[str]:
    return {f["code"] for f in site.flags()}


def test_more_replicas_than_the_lease_grants_are_flagged_from_the_bundle(tmp_path):
    """A customer patches the actor's cap check away and runs three replicas under a grant of
    one: the bundle's beats and reports show it."""
    async def scenario():
        site = AirGapSite(tmp_path, max_instances=1, max_gpus=1.0)
        site.replicas = {"r1": 1.0, "r2": 1.0, "r3": 1.0}
        await site.start()
        site.take(site.activate(site.request(instances=1, gpus=1.0)))
        site.actor._past_caps = lambda instances, gpus: None  # the patch
        for replica, gpus in site.replicas.items():
            await site.actor.register(replica, "m", gpus)
        await site.run(DAY)
        site.import_usage(site.export())
        return site

    site = run(scenario())
    flags = [f for f in site.flags() if f["code"].startswith("over_cap")]
    assert {f["code"] for f in flags} == {"over_cap_heartbeat", "over_cap_reported",
                                          "over_cap_gpus_heartbeat", "over_cap_gpus_reported"}
    heartbeat = next(f for f in flags if f["code"] == "over_cap_heartbeat")
    assert heartbeat["license_id"] == site.license.license_id and heartbeat["day"]
    assert heartbeat["evidence"] == {"instances": 3, "cap": 1}
    assert_books_agree(site)  # billed as run, all the same


def test_time_with_no_entries_while_the_lease_serves_is_flagged(tmp_path):
    """The actor is killed (no stop entry) while the ingress serves on its cached lease, and
    the replicas are replaced before it is started again: days with no entry at all."""
    async def scenario():
        site = await AirGapSite(tmp_path).start()
        site.take(site.activate(site.request()))
        await site.run(DAY)
        site.actor._ledger.close()
        site.actor = None  # killed; the gate's lease deadline is days away
        site.clock.advance(3 * DAY)
        serving = site.refusal()
        site.replicas = {"r3": 0.0, "r4": 0.0}
        await site.start()
        await site.run(DAY)
        site.import_usage(site.export())
        return site, serving

    site, serving = run(scenario())
    assert serving is None
    (slow,) = [f for f in site.flags() if f["code"] == "heartbeats_slow"]
    assert slow["cluster_id"] and slow["evidence"]["longest_gap_s"] >= 3 * DAY


def test_a_clean_stop_and_a_later_start_raise_no_flag(tmp_path):
    async def scenario():
        site = await AirGapSite(tmp_path).start()
        site.take(site.activate(site.request()))
        await site.run(DAY)
        await site.stop()
        site.clock.advance(3 * DAY)
        await site.start()
        await site.run(DAY)
        site.import_usage(site.export())
        return site

    site = run(scenario())
    assert site.flags() == []
    assert_books_agree(site)


def test_reports_from_a_clock_days_ahead_are_set_aside_and_flagged_not_a_lock_out(tmp_path):
    """The head node reboots with its clock two days ahead: what it logs after is in the
    vendor's future. Those reports are not billed, the cluster is flagged, and the rest of the
    bundle is billed and renewed."""
    async def scenario():
        site = await AirGapSite(tmp_path).start()
        site.take(site.activate(site.request()))
        await site.run(DAY)
        await site.stop()
        billed_before = site.customer_log_seconds()
        site.clock.skew = 2 * DAY
        site.reboot(600)
        await site.start()
        await site.run(DAY)
        renewal = json.loads(site.import_usage(site.export()))
        return site, billed_before, renewal

    site, billed_before, renewal = run(scenario())
    refused = renewal["refused_reports"]
    assert refused and {r["code"] for r in refused} == {"interval_in_future"}
    assert site.vendor_seconds() == pytest.approx(billed_before, abs=1e-3)
    assert site.vendor_seconds() + sum(r["seconds"] for r in refused) == pytest.approx(
        site.customer_log_seconds(), abs=1e-2)
    (alert,) = [f for f in site.flags() if f["code"] == "quarantined_reports"]
    assert alert["evidence"]["reports"] == len(refused)


@pytest.mark.parametrize("db", database_urls())
def test_the_vendors_desk_on_each_database(db, tmp_path):
    """Activation, billing once, a replay and a broken chain, on SQLite and PostgreSQL."""
    url = database_url(db, tmp_path)

    async def scenario():
        site = await AirGapSite(tmp_path, database_url=url).start()
        site.take(site.activate(site.request()))
        await site.run(DAY)
        bundle = site.export()
        renewal = site.import_usage(bundle)
        assert site.import_usage(bundle) == renewal
        site.take(renewal)
        await site.run(DAY)
        return site

    site = run(scenario())
    from license_contract import read_bundle, signed_in_file

    bundle = site.export()
    texts = read_bundle(signed_in_file(bundle, "bundle")).entries
    assert _refused(site, _resign(site, bundle, entries=texts[1:])) == "bundle_chain_broken"
    site.import_usage(bundle)
    assert_books_agree(site)
    view = site.desk.installations(site.license.license_id)["installations"]
    assert view[0]["bundles"] == 2
    site.service.store.engine.dispose()
