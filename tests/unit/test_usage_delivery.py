"""Usage delivery that one refused report cannot block, on clocks that disagree.

The license actor as a plain object with injected clocks (the customer's wall clock can be off
or stepped; the server's clock is true time), the real license server app behind
``LicenseWire``, which stamps ``X-Server-Time`` on every answer and refuses what the wire
contract refuses (intervals in the server's future, before the license, overlapping)."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import httpx
import pytest
from pydantic import SecretStr

from license_server.app import IssueRequest, LicenseService, build_app
from license_server.db import LicenseStore
from serve_app.licensing import LicenseConfig
from serve_app.licensing.actor import LicenseActor, RateLimitedError
from tests.fakes import VENDOR_KEY, Clocks, LicenseWire

HEARTBEAT_S = 10.0


def run(coro):
    return asyncio.run(coro)


class World:
    def __init__(self, tmp_path, t: float = 1_800_000_000.0) -> None:
        self.tmp_path = tmp_path
        self.clock = Clocks(t)
        self.store = LicenseStore(f"sqlite:///{tmp_path / 'server.db'}", now=self.clock).start()
        self.service = LicenseService(self.store, VENDOR_KEY, "http://license.test",
                                      now=self.clock)
        self.wire = LicenseWire(build_app(self.service, "admin"), server_now=self.clock,
                                latency=0.2, advance=self.clock.advance)
        self.lic, key = self.service.issue(IssueRequest(
            models=("*",), customer="ACME", heartbeat_interval_s=HEARTBEAT_S,
            grace_period_s=3600))
        self.wire.issued_at = self.lic.issued_at
        self.config = LicenseConfig(
            key=SecretStr(key),
            ledger_path=str(tmp_path / "ledger.db"), report_interval_s=60)

    def actor(self) -> LicenseActor:
        return LicenseActor(self.config, now=self.clock.wall, monotonic=self.clock.mono,
                            transport=self.wire, autostart=False)

    def server_total(self) -> float:
        return self.store.total_instance_seconds(self.lic.license_id)

    def posts(self, path: bytes) -> list[dict]:
        return [json.loads(s.partition(b" ")[2]) for s in self.wire.sent if s.startswith(path)]


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


def serve_for(world: World, actor: LicenseActor, seconds: float, ids=("r1",),
              step_at: float | None = None, step: float = 0.0) -> None:
    """Heartbeat ``ids`` every HEARTBEAT_S for ``seconds`` of true time, the actor ticking (and
    reporting every 60 s) as it does in production; the wall clock steps by ``step`` once
    ``step_at`` seconds have passed."""
    end = world.clock.t + seconds
    stepped = step_at is None
    begin = world.clock.t
    while world.clock.t < end - 1e-9:
        world.clock.advance(min(HEARTBEAT_S, end - world.clock.t))
        if not stepped and world.clock.t - begin >= step_at:
            world.clock.skew += step
            stepped = True
        for i in ids:
            run(actor.heartbeat(i, "m", 1.0))
        run(actor._tick())


# -- refused reports ------------------------------------------------------------------------------


def test_a_report_refused_with_400_is_quarantined_and_the_next_ones_arrive(world):
    actor = world.actor()
    bad = "i" * 200  # the server's limit for an instance id is 128 characters
    began = world.clock.t
    assert run(actor.register(bad, "m", 1.0))["ok"]
    run(actor._tick())
    serve_for(world, actor, 60, ids=(bad,))
    run(actor.deregister(bad))
    lifetime = world.clock.t - began
    run(actor.flush())
    refused = actor._ledger.quarantined()  # the 60 s report, and the rest up to the goodbye
    assert sum(r["seconds"] for r in refused) == pytest.approx(lifetime, abs=0.002)
    for r in refused:
        assert r["reason"].startswith("HTTP 400: intervals.0.instance_id: String should have at "
                                      "most 128 characters (invalid_request)")
    assert world.server_total() == 0

    began = world.clock.t
    run(actor.register("r1", "m", 1.0))
    serve_for(world, actor, 120)
    run(actor.deregister("r1"))
    lifetime = world.clock.t - began
    totals = run(actor.flush())
    assert totals["pending_seconds"] == 0
    assert world.server_total() == pytest.approx(lifetime)  # delivered past the refusal
    assert totals["instance_seconds"] - totals["quarantined_seconds"] == pytest.approx(
        world.server_total())

    status = run(actor.status())
    assert status["quarantined_reports"] == len(refused)
    assert status["quarantined_seconds"] == pytest.approx(sum(r["seconds"] for r in refused))
    assert status["quarantined"] == refused
    # The vendor hears of it in the heartbeats.
    run(actor._tick())
    beat = world.posts(b"/v1/heartbeat")[-1]
    assert (beat["quarantined_reports"], beat["quarantined_seconds"]) == (
        len(refused), status["quarantined_seconds"])

    # Re-sending the same report is refused the same way; nothing is counted twice.
    state = run(actor.resend(refused[0]["report_id"]))
    assert state["quarantined_at"] is not None and state["delivered_at"] is None
    assert world.server_total() == pytest.approx(lifetime)


def test_a_quarantined_report_resent_once_the_cause_is_fixed_is_billed_once(world):
    actor = world.actor()
    run(actor.register("r1", "m", 0.0))
    run(actor._tick())
    serve_for(world, actor, 30)
    world.wire.scripted["/v1/usage"].append(httpx.Response(409, json={"error": {
        "message": "report conflicts with billed usage", "type": "invalid_request_error",
        "param": None, "code": "conflict"}}))
    run(actor.flush())
    (refused,) = actor._ledger.quarantined()
    assert refused["reason"] == "HTTP 409: report conflicts with billed usage (conflict)"
    serve_for(world, actor, 30)
    run(actor.flush())
    totals = actor._ledger.totals()
    assert world.server_total() == pytest.approx(totals["instance_seconds"] - refused["seconds"])
    assert world.server_total() > 0

    state = run(actor.resend(refused["report_id"]))  # the vendor fixed its side
    assert state["delivered_at"] is not None
    assert run(actor.resend(refused["report_id"]))["delivered_at"] == state["delivered_at"]
    assert run(actor.status())["quarantined_reports"] == 0
    assert world.server_total() == pytest.approx(totals["instance_seconds"])


def test_429_retry_after_is_honoured(world):
    actor = world.actor()
    run(actor.register("r1", "m", 0.0))
    run(actor._tick())
    serve_for(world, actor, 50)
    world.wire.scripted["/v1/usage"].append(httpx.Response(429, headers={"Retry-After": "120"}))
    serve_for(world, actor, 10)  # the 60 s report: answered 429
    assert len(world.posts(b"/v1/usage")) == 1
    assert run(actor.status())["reports_rate_limited_for_s"] == pytest.approx(120, abs=1)
    serve_for(world, actor, 110)  # heartbeats go on; no usage report before 120 s
    assert len(world.posts(b"/v1/usage")) == 1
    assert world.server_total() == 0
    serve_for(world, actor, 20)
    assert len(world.posts(b"/v1/usage")) >= 2
    assert world.server_total() > 120
    run(actor.flush())
    assert world.server_total() == pytest.approx(actor._ledger.totals()["instance_seconds"])
    assert actor._ledger.quarantined() == []
    # A 429 on the heartbeat: the loop waits as long as the server asks.
    world.wire.scripted["/v1/heartbeat"].append(httpx.Response(429, headers={"Retry-After": "7"}))
    with pytest.raises(RateLimitedError) as caught:
        run(actor._tick())
    assert caught.value.retry_after == 7


def test_401_and_5xx_keep_the_report_pending_for_a_retry(world):
    actor = world.actor()
    run(actor.register("r1", "m", 0.0))
    run(actor._tick())
    serve_for(world, actor, 30)
    for status in (401, 403, 500, 503):
        world.wire.scripted["/v1/usage"].append(httpx.Response(status))
        with pytest.raises(httpx.HTTPStatusError):
            run(actor.flush())
    assert actor._ledger.quarantined() == []
    run(actor.flush())
    assert world.server_total() == pytest.approx(30, abs=0.5)


# -- clocks that disagree -------------------------------------------------------------------------


@pytest.mark.parametrize("skew", [600.0, -600.0])
def test_a_customer_clock_ten_minutes_off_loses_and_doubles_nothing(world, skew):
    world.clock.skew = skew
    actor = world.actor()
    began = world.clock.t
    # Registered before the server has answered: stamped with the host's clock at first.
    run(actor.register("r1", "m", 1.0))
    run(actor.register("r2", "m", 2.0))
    run(actor._tick())
    serve_for(world, actor, 1800, ids=("r1", "r2"))
    for i in ("r1", "r2"):
        run(actor.deregister(i))
    lifetime = world.clock.t - began
    totals = run(actor.flush())
    assert actor._ledger.quarantined() == []  # the wire refuses any interval off the server's time
    assert totals["pending_seconds"] == 0
    assert world.wire.billed() == pytest.approx(2 * lifetime)
    assert world.server_total() == pytest.approx(2 * lifetime)
    for report in world.wire.accepted.values():
        for it in report:
            assert world.lic.issued_at <= it["start"] < it["end"] <= world.clock.t
    status = run(actor.status())
    assert status["server_clock_offset_s"] == pytest.approx(-skew, abs=0.5)
    assert ("ahead of" if skew > 0 else "behind") in status["clock"]
    assert "600 s" in status["clock"] and "NTP" in status["clock"]


@pytest.mark.parametrize("step", [3600.0, -3600.0])
def test_a_wall_clock_step_of_an_hour_during_accrual_loses_and_doubles_nothing(world, step):
    actor = world.actor()
    began = world.clock.t
    run(actor.register("r1", "m", 1.0))
    world.clock.skew += step / 2  # a step before the server first answers
    run(actor._tick())
    serve_for(world, actor, 900, step_at=300, step=step)  # and one while serving
    # A restart of the actor in between: the clock continues from the ledger.
    actor._ledger.close()
    actor = world.actor()
    assert run(actor.status())["server_clock_offset_s"] == pytest.approx(-1.5 * step, abs=0.5)
    serve_for(world, actor, 600)
    run(actor.deregister("r1"))
    lifetime = world.clock.t - began
    totals = run(actor.flush())
    assert actor._ledger.quarantined() == []
    assert totals["instance_seconds"] == pytest.approx(lifetime)
    assert world.server_total() == pytest.approx(lifetime)


def test_the_server_clock_moving_back_never_overlaps_billed_seconds(world):
    """The server's own clock steps back after reports were billed (it fixed its NTP): later
    intervals continue the chain rather than overlap what was billed, and every second counts."""
    actor = world.actor()
    began = world.clock.t
    run(actor.register("r1", "m", 0.0))
    run(actor._tick())
    serve_for(world, actor, 120)
    run(actor.flush())
    world.clock.t -= 30  # true time, the server's clock, steps back; monotonic time does not
    world.clock._mono_origin -= 30
    world.clock.skew += 30  # the host's wall clock does not move
    serve_for(world, actor, 240)
    run(actor.deregister("r1"))
    lifetime = world.clock.t + 30 - began
    run(actor.flush())
    assert actor._ledger.quarantined() == []  # the wire refuses overlaps
    assert world.server_total() == pytest.approx(lifetime)


# -- the customer's audit log ---------------------------------------------------------------------


def test_the_usage_log_totals_equal_the_server_per_day(tmp_path):
    midnight = 1_800_057_600.0  # 2027-01-16 00:00 UTC
    world = World(tmp_path, t=midnight - 1800)
    world.clock.skew = 120.0
    actor = world.actor()
    run(actor.register("r1", "m", 1.0))
    run(actor.register("r2", "m", 4.0))
    run(actor._tick())
    serve_for(world, actor, 3600, ids=("r1", "r2"))
    run(actor.flush())
    check = actor._ledger.verify_log()
    assert check.ok and check.entries == len(world.wire.accepted)
    server = [{k: row[k] for k in ("license_id", "day", "instance_seconds", "gpu_seconds")}
              for row in world.service.usage(world.lic.license_id)["usage"]]
    mine = [{k: row[k] for k in ("license_id", "day", "instance_seconds", "gpu_seconds")}
            for row in check.days]
    assert [r["day"] for r in mine] == ["2027-01-15", "2027-01-16"]
    assert mine == server


def test_a_tampered_usage_log_is_detected(world):
    actor = world.actor()
    run(actor.register("r1", "m", 1.0))
    run(actor._tick())
    for _ in range(3):
        serve_for(world, actor, 60)
        run(actor.flush())
    assert actor._ledger.verify_log().entries == 3 and actor._ledger.verify_log().ok
    actor._ledger.close()
    path = world.config.ledger_path

    def tamper(sql, *args):
        with sqlite3.connect(path) as db:
            db.execute(sql, args)

    def check():
        from serve_app.licensing.ledger import UsageLedger

        led = UsageLedger(path).start()
        try:
            return led.verify_log()
        finally:
            led.close()

    with sqlite3.connect(path) as db:
        seq, text = db.execute("SELECT seq, entry FROM usage_log ORDER BY seq LIMIT 1 OFFSET 1"
                               ).fetchone()
    entry = json.loads(text)
    entry["intervals"][0]["end"] -= 10  # a bill 10 s lighter
    forged = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    tamper("UPDATE usage_log SET entry = ? WHERE seq = ?", forged, seq)
    assert [p.split(":")[0] for p in check().problems] == [f"entry {seq} ({entry['report_id']})"]
    # Re-hashing the forged entry moves the break to the next one.
    from serve_app.licensing.usage_log import entry_hash

    tamper("UPDATE usage_log SET hash = ? WHERE seq = ?", entry_hash(forged), seq)
    problems = check().problems
    assert len(problems) == 1 and problems[0].startswith(f"entry {seq + 1} ")
    tamper("UPDATE usage_log SET entry = ?, hash = ? WHERE seq = ?", text, entry_hash(text), seq)
    assert check().ok
    tamper("DELETE FROM usage_log WHERE seq = ?", seq)
    assert not check().ok


def test_a_server_without_its_time_and_a_restart_after_a_wall_step_lose_nothing(world):
    """A server that sends no X-Server-Time: usage is stamped with the host's clock as read at
    start, and an actor restarted after a wall-clock step continues that time base."""
    world.wire.server_now = None
    actor = world.actor()
    began = world.clock.t
    run(actor.register("r1", "m", 0.0))
    run(actor._tick())
    serve_for(world, actor, 120)
    assert "does not send its time" in run(actor.status())["clock"]
    world.clock.skew += 3600
    actor._ledger.close()
    actor = world.actor()
    serve_for(world, actor, 120)
    run(actor.deregister("r1"))
    lifetime = world.clock.t - began
    assert run(actor.flush())["instance_seconds"] == pytest.approx(lifetime)
    assert world.server_total() == pytest.approx(lifetime)


def test_flush_before_the_server_has_answered_checks_in_first(world):
    world.clock.skew = 900.0
    actor = world.actor()
    run(actor.register("r1", "m", 0.0))
    world.clock.advance(30)
    run(actor.heartbeat("r1", "m", 0.0))
    totals = run(actor.flush())  # no tick yet: it measures the server's time, then seals
    assert totals["pending_seconds"] == 0 and actor._ledger.quarantined() == []
    assert world.server_total() == pytest.approx(30)
