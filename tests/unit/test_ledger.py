from __future__ import annotations

import random

import pytest

from serve_app.licensing.ledger import UsageLedger


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def ledger(tmp_path, clock):
    led = UsageLedger(tmp_path / "usage.db", now=clock).start()
    yield led
    led.close()


def test_billed_seconds_equal_replica_lifetimes(ledger, clock):
    """Many replicas over a simulated day with jittered heartbeats: the ledger's total matches
    the sum of lifetimes within 1 s per instance-hour."""
    rng = random.Random(1)
    lifetimes = {}
    events = []
    for i in range(20):
        start = rng.uniform(0, 40_000)
        life = rng.uniform(600, 30_000)
        lifetimes[f"r{i}"] = life
        events.append((start, "register", f"r{i}"))
        t = start
        while True:
            t += rng.uniform(25, 35)
            if t >= start + life:
                break
            events.append((t, "heartbeat", f"r{i}"))
        events.append((start + life, "deregister", f"r{i}"))
    base = clock.t
    sealed = 0.0
    for k, (t, kind, iid) in enumerate(sorted(events)):
        clock.t = base + t
        if kind == "register":
            ledger.register(iid, "m", gpus=1)
        elif kind == "heartbeat":
            ledger.heartbeat(iid)
        else:
            ledger.deregister(iid)
        if k % 97 == 0:  # reports sealed mid-run must not lose or double anything
            (report,) = ledger.seal_reports() or (None,)
            if report:
                sealed += report.seconds
                ledger.mark_delivered(report.report_id)
    (final,) = ledger.seal_reports() or (None,)
    sealed += final.seconds if final else 0.0
    expected = sum(lifetimes.values())
    assert ledger.totals()["instance_seconds"] == pytest.approx(sealed)
    assert abs(sealed - expected) <= expected / 3600 * 1.0
    assert ledger.live() == []
    clock.t += 10
    ledger.heartbeat("r0")  # a late heartbeat after the goodbye bills nothing
    assert ledger.totals()["instance_seconds"] == pytest.approx(sealed)


def test_dead_replica_stops_counting(ledger, clock):
    ledger.register("a", "m", 0)
    ledger.register("b", "m", 0)
    clock.t += 10
    ledger.heartbeat("a")
    ledger.heartbeat("b")
    clock.t += 10
    ledger.heartbeat("a")  # b died silently
    clock.t += 10
    ledger.heartbeat("a")
    assert ledger.expire(timeout_s=20) == ["b"]
    assert [i["instance_id"] for i in ledger.live()] == ["a"]
    assert ledger.totals()["instance_seconds"] == 30 + 10


def test_gap_while_the_actor_was_down_is_billed_on_the_next_heartbeat(ledger, clock):
    ledger.register("a", "m", 0)
    clock.t += 100  # no heartbeats reached the actor meanwhile
    assert ledger.expire(timeout_s=20) == ["a"]
    assert ledger.heartbeat("a") is True  # the replica was alive: revived, gap billed
    assert ledger.totals()["instance_seconds"] == 100
    assert ledger.heartbeat("unknown") is False


def test_reports_are_exactly_once_across_a_crash(tmp_path, clock):
    path = tmp_path / "usage.db"
    led = UsageLedger(path, now=clock).start()
    led.register("a", "m", 2)
    clock.t += 60
    led.heartbeat("a")
    (report,) = led.seal_reports()
    assert report.seconds == 60 and report.intervals[0]["gpus"] == 2
    led.close()  # crash before delivery

    led = UsageLedger(path, now=clock).start()
    (again,) = led.pending_reports()
    assert again == report  # same id: the server will dedupe a replay
    clock.t += 30
    led.heartbeat("a")
    led.mark_delivered(report.report_id)
    assert led.pending_reports() == []
    assert led.totals()["pending_seconds"] == 30
    (nxt,) = led.seal_reports()
    assert nxt.report_id != report.report_id and nxt.seconds == 30
    assert led.totals()["instance_seconds"] == 90
    assert led.cluster_id() == led.cluster_id()


def test_reports_keep_to_the_servers_limits(ledger, clock):
    """No interval longer than a day, no report over the interval limit (2,000 by default,
    5 here); each instance's intervals still chain end to start."""
    ledger.register("long", "m", 1)
    clock.t += 3 * 86400
    for i in range(7):
        ledger.register(f"r{i}", "m", 0)
    clock.t += 5
    for i in ["long"] + [f"r{i}" for i in range(7)]:
        ledger.heartbeat(i)
    reports = ledger.seal_reports("lic_a", max_intervals=5)
    assert [len(r.intervals) for r in reports] == [5, 5, 1]
    pieces = sorted((i["start"], i["end"]) for r in reports for i in r.intervals
                    if i["instance_id"] == "long")
    assert [round(e - s) for s, e in pieces] == [86400, 86400, 86400, 5]
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:], strict=False))
    assert sum(r.seconds for r in reports) == pytest.approx(3 * 86400 + 5 + 7 * 5)


def test_rebase_keeps_every_second_and_never_overlaps_sealed_ones(ledger, clock):
    ledger.register("a", "m", 0)
    clock.t += 100
    ledger.heartbeat("a")
    (sealed,) = ledger.seal_reports()
    clock.t += 50
    ledger.heartbeat("a")
    # The clock jumps back 300 s: the open interval cannot move back over the sealed one.
    clock.t -= 300
    ledger.rebase(-300)
    clock.t += 20
    ledger.heartbeat("a")
    (after,) = ledger.seal_reports()
    (it,) = after.intervals
    assert it["start"] == sealed.intervals[-1]["end"] and it["end"] - it["start"] == 70
    # It jumps forward again: the chain gives back its lead (a gap, not extra seconds).
    clock.t += 300
    ledger.rebase(300)
    clock.t += 10
    ledger.heartbeat("a")
    (last,) = ledger.seal_reports()
    assert last.intervals[0]["end"] == clock.t and last.seconds == 10
    assert ledger.totals()["instance_seconds"] == 180


def test_quarantine_steps_aside_and_requeue_offers_it_again(ledger, clock):
    ledger.register("a", "m", 0)
    clock.t += 10
    ledger.heartbeat("a")
    (first,) = ledger.seal_reports("lic_a")
    clock.t += 20
    ledger.heartbeat("a")
    (second,) = ledger.seal_reports("lic_a")
    ledger.quarantine(first.report_id, "HTTP 400: no (invalid)")
    assert [r.report_id for r in ledger.pending_reports()] == [second.report_id]
    totals = ledger.totals("lic_a")
    assert (totals["pending_seconds"], totals["quarantined_seconds"],
            totals["quarantined_reports"]) == (20, 10, 1)
    (q,) = ledger.quarantined()
    assert (q["report_id"], q["seconds"], q["reason"]) == (first.report_id, 10,
                                                           "HTTP 400: no (invalid)")
    ledger.mark_delivered(second.report_id, "lic_a")
    assert ledger.requeue(first.report_id) and not ledger.requeue(first.report_id)
    assert [r.report_id for r in ledger.pending_reports()] == [first.report_id]
    ledger.mark_delivered(first.report_id, "lic_a")
    ledger.mark_delivered(first.report_id, "lic_a")  # a replay changes nothing
    assert ledger.quarantined() == [] and not ledger.requeue(first.report_id)
    check = ledger.verify_log()
    assert check.ok and check.entries == 2
    assert check.days[0]["instance_seconds"] == 30


def test_totals_are_the_license_in_force(ledger, clock):
    ledger.register("a", "m", 0, license_id="lic_old")
    clock.t += 100
    ledger.heartbeat("a", "lic_old")
    (old,) = ledger.seal_reports()
    ledger.mark_delivered(old.report_id, "lic_old")
    clock.t += 30
    ledger.heartbeat("a", "lic_old")  # accrued before the renewal: still the old license's
    clock.t += 20
    ledger.heartbeat("a", "lic_new")
    new = ledger.totals("lic_new")
    assert (new["instance_seconds"], new["pending_seconds"], new["other_pending_seconds"]) == (
        20, 20, 30)
    assert ledger.totals("lic_old")["instance_seconds"] == 130
    assert ledger.totals()["instance_seconds"] == 150


def test_every_interval_is_sealed_under_the_license_it_accrued_under(ledger, clock):
    ledger.register("a", "m", 1.0, license_id="lic_1")
    ledger.register("b", "m", 2.0, license_id="lic_1")
    clock.t += 30
    ledger.heartbeat("a", "lic_1")
    clock.t += 30
    ledger.heartbeat("a", "lic_2")  # the license changed between two heartbeats of a
    ledger.heartbeat("b", "lic_2")
    sealed = ledger.seal_reports(max_intervals=1)
    assert sorted(r.license_id for r in sealed) == ["lic_1", "lic_2", "lic_2"]
    by_license: dict[str, float] = {}
    for r in ledger.pending_reports():
        by_license[r.license_id] = by_license.get(r.license_id, 0.0) + r.seconds
    # a: 30 s under each; b: its first 60 s, all accrued at its heartbeat under lic_2.
    assert by_license == {"lic_1": 30, "lic_2": 90}
    a = sorted((i["start"], i["end"]) for r in sealed for i in r.intervals
               if i["instance_id"] == "a")
    assert a == [(clock.t - 60, clock.t - 30), (clock.t - 30, clock.t)]  # one chain


def test_keys_are_kept_per_license_in_files_only_their_owner_reads(tmp_path, clock):
    import stat

    folder = tmp_path / "fresh" / "ledger"
    led = UsageLedger(folder / "usage.db", now=clock).start()
    try:
        led.remember_key("lic_1", "MTL1.first.key")
        led.remember_key("lic_2", "MTL1.second.key")
        assert (led.key_of("lic_1"), led.key_of("lic_2"), led.key_of("lic_3")) == (
            "MTL1.first.key", "MTL1.second.key", None)
        led.register("a", "m", 0.0, license_id="lic_1")  # the write-ahead log exists now
    finally:
        led.close()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = list(folder.iterdir())
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files), files
    # A ledger left readable by others (an older build, a copy) is tightened on start; a folder
    # the ledger was given is left as it is.
    (tmp_path / "given").mkdir(mode=0o755)
    loose = tmp_path / "given" / "usage.db"
    loose.touch(mode=0o644)
    loose.chmod(0o644)
    UsageLedger(loose, now=clock).start().close()
    assert stat.S_IMODE(loose.stat().st_mode) == 0o600
    assert stat.S_IMODE(loose.parent.stat().st_mode) == 0o755
