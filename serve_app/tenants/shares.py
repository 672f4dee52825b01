"""How the key actor splits each key's limits between replicas: shares that follow demand.

Every replica reports, once a round (about a second), how many requests of each key it was
asked; the actor keeps a smoothed rate per replica and key and moves each key's shares toward

    target_i = FLOOR / N + (1 - FLOOR) * demand_i / sum(demand)      (1 / N with no demand)

over the N replicas that reported recently. ``FLOOR`` keeps a share on every replica, so that a
key's first request on a quiet replica is served at once; the rest follows where the key's
requests arrive. Its price: a key whose requests all reach one replica of N can use
``1 - FLOOR * (N - 1) / N`` of its limit (95% with two replicas).

The bound. The shares of a key never sum to more than 1, and a replica's buckets never grow by
a change of share (``limits.Bucket.resize``): the only excess comes from replicas that apply a
round's new shares at different times, a replica whose share grew refilling faster before the
one whose share shrank has heard. One round moves at most ``STEP`` of a key's share between
replicas (share nobody holds, at start or after a replica is gone, is handed out at once), and
every replica hears within a round, so while shares move the key's rate exceeds its limit by at
most ``STEP`` (25%) for that round, and not at all once they have settled. Concurrency slots are
whole numbers per replica summing to the limit; they move with the shares.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping

FLOOR = 0.1
STEP = 0.25
SMOOTHING = 0.5  # weight of the newest rate in the smoothed demand


class ShareBook:
    """``now`` is a monotonic clock (injected by tests). A replica is live while it reported
    within ``stale_s``; a key's share of a replica gone stale is free again."""

    def __init__(self, stale_s: float = 5.0, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self._stale_s = stale_s
        self._seen: dict[str, float] = {}  # replica -> when it last reported
        self._demand: dict[tuple[str, str], float] = {}  # (key, replica) -> requests/s
        self._shares: dict[str, dict[str, float]] = {}  # key -> replica -> share

    def report(self, replica: str, asked: Mapping[str, int]) -> None:
        """``asked``: requests per key since this replica's last report."""
        now = self._now()
        last = self._seen.get(replica)
        self._seen[replica] = now
        if last is None:
            return
        elapsed = max(now - last, 1e-3)
        keys = {k for k, r in self._demand if r == replica} | set(asked)
        for key in keys:
            rate = asked.get(key, 0) / elapsed
            old = self._demand.get((key, replica))
            self._demand[(key, replica)] = rate if old is None else (
                SMOOTHING * rate + (1 - SMOOTHING) * old)

    def live(self) -> list[str]:
        cutoff = self._now() - self._stale_s
        return sorted(r for r, t in self._seen.items() if t >= cutoff)

    def forget(self, replica: str) -> None:
        """A replica that said goodbye: its shares are free at the next round."""
        self._seen.pop(replica, None)

    def rebalance(self, keys: Iterable[str]) -> None:
        """One round for ``keys`` (the limited keys of the table)."""
        live = self.live()
        for replica in set(self._seen) - set(live):
            del self._seen[replica]
        self._demand = {(k, r): d for (k, r), d in self._demand.items() if r in live}
        keys = set(keys)
        self._shares = {k: v for k, v in self._shares.items() if k in keys}
        for key in keys:
            self._shares[key] = _move(self._shares.get(key, {}), live,
                                      {r: self._demand.get((key, r), 0.0) for r in live})

    def shares(self, replica: str) -> dict[str, float]:
        return {key: held.get(replica, 0.0) for key, held in self._shares.items()}

    def key_shares(self, key: str) -> dict[str, float]:
        return dict(self._shares.get(key, {}))

    def slots(self, replica: str, limits: Mapping[str, int]) -> dict[str, int]:
        """This replica's whole number of each key's ``limits`` (concurrency)."""
        return {key: whole_slots(limit, self._shares.get(key, {})).get(replica, 0)
                for key, limit in limits.items()}


def targets(live: list[str], demand: Mapping[str, float]) -> dict[str, float]:
    if not live:
        return {}
    total = sum(demand.values())
    if total <= 0:
        return {r: 1 / len(live) for r in live}
    return {r: FLOOR / len(live) + (1 - FLOOR) * demand[r] / total for r in live}


def _move(held: Mapping[str, float], live: list[str], demand: Mapping[str, float]
          ) -> dict[str, float]:
    shares = {r: held.get(r, 0.0) for r in live}
    goal = targets(live, demand)
    if not goal:
        return {}
    # Share nobody holds goes at once to whoever is short of their target: no replica spends
    # it already, so nothing is exceeded.
    free = 1.0 - sum(shares.values())
    short = {r: max(goal[r] - shares[r], 0.0) for r in live}
    wanted = sum(short.values())
    if free > 1e-12 and wanted > 0:
        given = min(1.0, free / wanted)
        for r in live:
            shares[r] += short[r] * given
    # Between replicas, at most STEP a round (see the module docstring).
    delta = {r: goal[r] - shares[r] for r in live}
    rising = sum(d for d in delta.values() if d > 0)
    if rising > 0:
        alpha = min(1.0, STEP / rising)
        for r in live:
            shares[r] += alpha * delta[r]
    total = sum(shares.values())
    if total > 1.0:  # rounding only
        shares = {r: s / total for r, s in shares.items()}
    return {r: max(0.0, s) for r, s in shares.items()}


def whole_slots(limit: int, shares: Mapping[str, float]) -> dict[str, int]:
    """``limit`` concurrency slots split by ``shares`` into whole numbers that sum to at most
    ``limit`` (largest remainders first, ties by replica id)."""
    if not shares:
        return {}
    exact = {r: limit * s for r, s in shares.items()}
    out = {r: math.floor(x) for r, x in exact.items()}
    spare = min(limit, round(limit * sum(shares.values()))) - sum(out.values())
    for r in sorted(exact, key=lambda r: (out[r] - exact[r], r))[:max(0, spare)]:
        out[r] += 1
    return out
