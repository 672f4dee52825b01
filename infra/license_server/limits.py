"""Abuse limits, in memory, with an injected clock: token buckets per key (address, license)
and failed-authentication counting per address. Memory is bounded: past ``max_keys`` the least
recently seen key is forgotten (it starts again with a full bucket, which only ever errs on the
side of the client)."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable


class RateLimiter:
    """A token bucket per key: ``rate`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: float, now: Callable[[], float],
                 max_keys: int = 10_000) -> None:
        self._rate = rate
        self._burst = burst
        self._now = now
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """0 when the request may go; else the seconds until a token is there."""
        now = self._now()
        tokens, at = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + max(0.0, now - at) * self._rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self._rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return wait


class FailedAuth:
    """Failed authentications per address in a fixed window; ``blocked`` says how long an
    address that reached ``limit`` failures must wait before its next attempt is looked at."""

    def __init__(self, limit: int, window_s: float, now: Callable[[], float],
                 max_keys: int = 10_000) -> None:
        self._limit = limit
        self._window = window_s
        self._now = now
        self._max_keys = max_keys
        self._seen: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def _current(self, key: str) -> tuple[float, int]:
        since, count = self._seen.get(key, (self._now(), 0))
        if self._now() - since >= self._window:
            return self._now(), 0
        return since, count

    def blocked(self, key: str) -> float:
        since, count = self._current(key)
        if count < self._limit:
            return 0.0
        return max(0.0, since + self._window - self._now())

    def failed(self, key: str) -> None:
        since, count = self._current(key)
        self._seen.pop(key, None)
        self._seen[key] = (since, count + 1)
        while len(self._seen) > self._max_keys:
            self._seen.popitem(last=False)


def retry_after(wait_s: float) -> str:
    """``Retry-After`` in whole seconds, never 0 (a client told 0 would retry at once)."""
    return str(max(1, math.ceil(wait_s)))
