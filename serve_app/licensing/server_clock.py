"""The license server's time as this process estimates it. Pure: both clocks are injected.

Usage intervals are stamped in the server's time, because the server judges them by its own
clock (an interval ending in its future is refused), and the customer's clock may be minutes off
or stepped by NTP or a restored VM snapshot. The estimate is ``monotonic() + offset``: durations
come from the monotonic clock alone, so a step of the wall clock neither adds nor removes a
second, and the offset changes only when a better measurement says so.

Each server response carries ``X-Server-Time`` (its wall clock when it answered). Against the
midpoint of the request on the monotonic clock, that gives the offset to within half the round
trip. The estimate keeps the sample with the smallest uncertainty, where an old sample's
uncertainty grows with its age (the two clocks drift apart slowly), so a fresh sample takes over
when it is about as good, and a slow round trip never displaces a fast one.

Until the first sample the offset is 0 against the wall clock as it read at start.

Leases are judged by ``latest()``, which never goes backwards: the estimate, but never earlier
than the latest server time this host has seen (the server's own stamps, a lease's signed issue
time, and the estimate whenever it rests on a measurement). The actor keeps that floor in the
ledger, so that neither a wall clock set back nor a restart rewinds it; after a reboot, where
monotonic time starts again, the estimate starts from the later of the floor and the wall clock
plus the offset measured before.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from license_contract import SERVER_TIME_HEADER

HEADER = SERVER_TIME_HEADER
# How fast an old sample loses trust: generous for a quartz clock (tens of ppm).
DRIFT = 1e-4
# The applied offset follows the estimate only when they differ by more than this: every change
# re-stamps the open intervals, and the server tolerates minutes, not milliseconds.
RESYNC_S = 1.0


@dataclass(frozen=True)
class Sample:
    offset: float  # server time minus monotonic time
    error_s: float  # half the round trip
    taken_at: float  # monotonic


class ServerClock:
    def __init__(self, wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 resync_s: float = RESYNC_S) -> None:
        self._wall = wall
        self._mono = monotonic
        self._resync_s = resync_s
        self._offset = wall() - monotonic()
        self._best: Sample | None = None
        self._floor = 0.0  # the latest server time seen
        self.synced = False  # a sample taken (or restored) in this boot

    def now(self) -> float:
        """The server's time, as estimated now."""
        return self._mono() + self._offset

    def monotonic(self) -> float:
        return self._mono()

    def latest(self) -> float:
        """The server's time for judging leases: the estimate, never earlier than the latest
        server time seen. A guess (no measurement yet in this boot) does not raise the floor:
        a host clock that is off must not shorten the first lease it receives."""
        now = self.now()
        if self.synced:
            self._floor = max(self._floor, now)
        return max(self._floor, now)

    @property
    def floor(self) -> float:
        """The latest server time seen (persisted by the actor)."""
        return self._floor

    def see(self, server_time: float) -> None:
        """A time the server itself stated (its stamp on an answer, a lease's issue time): the
        server's time is at least this from now on."""
        if math.isfinite(server_time):
            self._floor = max(self._floor, server_time)

    @property
    def offset(self) -> float:
        """Server time minus monotonic time: what ``now`` adds (persisted across restarts)."""
        return self._offset

    def wall_offset_s(self) -> float:
        """How far the server's clock is ahead of this host's (negative: behind)."""
        return self.now() - self._wall()

    def error_s(self) -> float | None:
        """The estimate's uncertainty now; None before the first sample."""
        best = self._best
        if best is None:
            return None
        return best.error_s + max(0.0, self._mono() - best.taken_at) * DRIFT

    def restore(self, offset: float, error_s: float | None = None, floor: float = 0.0) -> None:
        """Continue from an offset used earlier in this boot (monotonic time still counts from
        the same origin); ``error_s`` None: it was a guess, not a measurement. ``floor``: the
        latest server time seen before."""
        self._offset = offset
        self._floor = max(self._floor, floor)
        if error_s is not None:
            self._best = Sample(offset, error_s, self._mono())
            self.synced = True

    def start_from_wall_offset(self, server_minus_wall: float, floor: float = 0.0) -> None:
        """Best guess after a reboot: the server was this far from the wall clock before, and
        its time was at least ``floor`` (a wall clock set back cannot take it earlier)."""
        self._floor = max(self._floor, floor)
        self._offset = max(self._floor, self._wall() + server_minus_wall) - self._mono()

    def sample(self, sent: float, received: float, header: str | None) -> float:
        """Take a measurement from a response; returns by how much ``now`` jumped (0.0 when
        the applied offset did not change). ``sent`` and ``received`` are monotonic times."""
        server = parse_header(header)
        if server is None or received < sent:
            return 0.0
        self.see(server)
        sample = Sample(server - (sent + received) / 2, (received - sent) / 2, received)
        current = self.error_s()
        if current is None or sample.error_s <= current:
            self._best = sample
        self.synced = True
        assert self._best is not None
        delta = self._best.offset - self._offset
        if abs(delta) <= self._resync_s:
            return 0.0
        self._offset = self._best.offset
        return delta


def parse_header(value: str | None) -> float | None:
    """The header's Unix time, or None when absent or not a finite number."""
    if value is None:
        return None
    try:
        server = float(value)
    except ValueError:
        return None
    return server if math.isfinite(server) and server > 0 else None
