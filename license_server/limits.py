"""What the license server accepts and how hard it can be pushed.

``ServerPolicy`` holds the numbers the vendor may tune: set through ``LicenseServerSettings``
(env ``LICENSE_SERVER_POLICY__<FIELD>``), read by the routes and the service. The limits on what
a report may hold are not among them: both sides hold reports to ``license_contract.usage``.

The limiters keep their state in memory, with an injected clock: a token bucket per key
(address, license) and failed authentications per address. Memory is bounded: past
``max_keys`` the least recently seen key is forgotten (it starts again with a full bucket, which
only ever errs on the side of the client).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

# The admin token is the key to every license: long enough that guessing is hopeless (the
# generated one is 43 characters).
MIN_ADMIN_TOKEN_CHARS = 32


class ServerPolicy(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    # -- abuse limits (token buckets; the actor's steady rate is a few requests a minute) -------
    license_rate_per_s: float = Field(20.0, gt=0, description="Client requests/s per license.")
    license_burst: float = Field(300.0, ge=1, description="Client request burst per license.")
    address_rate_per_s: float = Field(50.0, gt=0, description="Client requests/s per address.")
    address_burst: float = Field(600.0, ge=1, description="Client request burst per address.")
    auth_failures: int = Field(
        20, ge=1, description="Failed authentications per address within the window, then 429.")
    auth_window_s: float = Field(60.0, gt=0, description="The failed-authentication window.")
    tracked_keys: int = Field(
        10_000, ge=100, description="Addresses/licenses remembered by the limiters (oldest go).")

    # -- who may check in ------------------------------------------------------------------------
    accept_development: bool = Field(
        False, description="Take heartbeats from builds that do not pin this server's key "
        "(development licenses): true only for a local development server.")
    max_clusters: int = Field(
        16, ge=1, description="Clusters of one license that may hold an unexpired lease at once "
        "(a lease lets its cluster serve until it expires, heard from or not); the activation or "
        "heartbeat of one more is refused with 403 too_many_clusters.")
    max_new_clusters_per_day: int = Field(
        10, ge=1, description="New cluster ids of one license in a UTC day (refused ones "
        "included) above which the day is flagged cluster_churn.")

    # -- cross-checks ----------------------------------------------------------------------------
    heartbeat_slow_intervals: float = Field(
        3.0, ge=1, description="A gap between two heartbeats of a cluster longer than this many "
        "of the license's heartbeat intervals (and the floor) is flagged heartbeats_slow.")
    heartbeat_slow_floor_s: float = Field(
        180.0, gt=0, description="Gaps up to this long are never slow, nor a cluster silent.")
    silent_intervals: float = Field(
        5.0, ge=1, description="A cluster of an active license not heard from for this many "
        "heartbeat intervals (and the floor), whose last heartbeat did not say it stops, raises "
        "cluster_silent.")
    crosscheck_ratio: float = Field(
        0.10, gt=0, description="Reported vs heartbeat-observed instance (GPU) time per day: "
        "flag beyond this.")
    crosscheck_slack_s: float = Field(
        300.0, ge=0, description="Differences below this many instance-seconds (GPU-seconds) "
        "are never flagged.")
    window_days: int = Field(
        30, ge=1, le=366, description="The longer window of the shortfall check, in days.")
    window_ratio: float = Field(
        0.02, gt=0, description="Reported short of observed over the window by more than this: "
        "flag reported_short_window.")
    report_window_s: float = Field(
        3600.0, gt=0, description="Running time heartbeats saw and no report covered for this "
        "long: flag reports_missing; an hour is held against reports once this long has passed "
        "since it ended.")

    # -- slow clients --------------------------------------------------------------------------
    body_timeout_s: float = Field(
        30.0, gt=0, description="A request body not received whole within this many seconds is "
        "refused (408): a client cannot hold a request open by sending slowly.")

    # -- admin queries -----------------------------------------------------------------------------
    page_limit: int = Field(1000, ge=1, description="Default rows per GET /admin/usage page.")
    max_page_limit: int = Field(10_000, ge=1, description="Largest rows per page.")


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
