"""The estimate of the license server's time: pure, with both clocks injected."""

from __future__ import annotations

import pytest

from serve_app.licensing.server_clock import ServerClock, parse_header


class Host:
    def __init__(self) -> None:
        self.wall_t = 1_800_000_000.0
        self.mono_t = 500.0

    def wall(self) -> float:
        return self.wall_t

    def mono(self) -> float:
        return self.mono_t


def test_offset_is_zero_until_the_first_sample_and_ignores_wall_steps():
    host = Host()
    clock = ServerClock(host.wall, host.mono)
    assert clock.now() == host.wall_t and not clock.synced and clock.error_s() is None
    host.wall_t += 3600  # a step: the estimate keeps counting on the monotonic clock
    host.mono_t += 10
    assert clock.now() == 1_800_000_010.0
    assert clock.wall_offset_s() == -3590


def test_a_sample_is_taken_at_the_midpoint_of_the_request():
    host = Host()
    clock = ServerClock(host.wall, host.mono)
    # Sent at 500, answered at 500.4; the server stamped 1_800_000_600.2 at the midpoint.
    delta = clock.sample(500.0, 500.4, "1800000600.2")
    assert delta == pytest.approx(600.0)
    host.mono_t = 500.4
    assert clock.now() == pytest.approx(1_800_000_600.4)
    assert clock.error_s() == pytest.approx(0.2) and clock.synced


def test_the_fastest_round_trip_wins_and_small_changes_do_not_move_the_clock():
    host = Host()
    clock = ServerClock(host.wall, host.mono)

    def sample(sent, received, server):
        host.mono_t = received
        return clock.sample(sent, received, repr(server))

    sample(500.0, 500.02, 1_800_000_100.01)  # server = wall + 100, error 0.01
    before = clock.offset
    # A slow round trip, 2 s off: not better than the fast one, ignored.
    assert sample(501.0, 505.0, 1_800_000_105.0) == 0.0 and clock.offset == before
    assert clock.error_s() < 0.011
    # A fast one 0.5 s off: the estimate follows, the applied offset waits for a real change.
    assert sample(506.0, 506.01, 1_800_000_000.0 + 100.5 + 6.005) == 0.0
    assert clock.offset == before
    # The server's clock stepped by 30 s: the first fast sample moves the clock.
    assert sample(510.0, 510.01, 1_800_000_000.0 + 130 + 10.005) == pytest.approx(30, abs=0.01)


def test_an_old_sample_loses_to_a_slower_fresh_one_in_time():
    host = Host()
    clock = ServerClock(host.wall, host.mono)
    clock.sample(500.0, 500.002, "1800000000.001")
    host.mono_t = 500.0 + 86400  # a day later the old sample's error has grown to ~8.6 s
    assert clock.error_s() == pytest.approx(0.001 + 8.64)
    assert clock.sample(host.mono_t, host.mono_t + 1.0, str(1_800_000_000 + 86400.5 + 5)) == (
        pytest.approx(5.0))


@pytest.mark.parametrize("value", [None, "", "soon", "nan", "inf", "-5"])
def test_a_missing_or_bad_header_is_no_sample(value):
    host = Host()
    clock = ServerClock(host.wall, host.mono)
    assert parse_header(value) is None
    assert clock.sample(500.0, 500.1, value) == 0.0 and not clock.synced


def test_the_lease_clock_never_goes_back_though_the_estimate_may():
    host = Host()
    clock = ServerClock(host.wall, host.mono)
    host.mono_t = 500.01
    clock.sample(500.0, 500.01, "1800000100.005")  # the server is 100 s ahead of the wall
    assert clock.latest() == pytest.approx(1_800_000_100.01)
    host.mono_t = 600.0
    peak = clock.latest()
    # The server's clock steps back 50 s: usage follows it, leases are judged from the peak.
    host.mono_t = 600.01
    assert clock.sample(600.0, 600.01, repr(peak - 50)) == pytest.approx(-50, abs=0.1)
    assert clock.now() == pytest.approx(peak - 50 + 0.01, abs=0.01)
    assert clock.latest() == pytest.approx(peak, abs=0.001)
    host.mono_t += 60  # once the estimate passes the floor, the floor follows it again
    assert clock.latest() == pytest.approx(clock.now()) and clock.latest() > peak


def test_a_guess_does_not_raise_the_floor_but_a_server_stamp_does():
    host = Host()
    host.wall_t += 86400  # this host's clock is a day ahead, and nothing is measured yet
    clock = ServerClock(host.wall, host.mono)
    assert clock.latest() == host.wall_t and clock.floor == 0.0
    clock.see(1_800_000_000.0)  # a lease's issue time
    assert clock.floor == 1_800_000_000.0
    host.mono_t += 1
    clock.sample(host.mono_t - 0.01, host.mono_t, "1800000001.0")
    assert clock.latest() == pytest.approx(1_800_000_001.005)


def test_after_a_reboot_the_estimate_starts_no_earlier_than_the_floor():
    host = Host()
    clock = ServerClock(host.wall, host.mono)
    host.wall_t -= 3 * 86400  # the wall clock was set back three days, then the host rebooted
    clock.start_from_wall_offset(0.0, floor=1_800_000_000.0)
    assert clock.now() == clock.latest() == 1_800_000_000.0
    host.mono_t += 10
    assert clock.latest() == 1_800_000_010.0
    honest = ServerClock(Host().wall, Host().mono)  # an honest clock after a reboot: the wall
    honest.start_from_wall_offset(5.0, floor=1_799_999_000.0)
    assert honest.now() == 1_800_000_005.0
