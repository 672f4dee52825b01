"""What the license server accepts and how hard it can be pushed: one frozen model, set through
``LicenseServerSettings`` (env ``LICENSE_SERVER_POLICY__<FIELD>``) and read by the routes and the
service. The wire limits are the contract the app's license actor is written against."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ServerPolicy(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    # -- the usage report contract --------------------------------------------------------------
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body (413 above).")
    max_intervals: int = Field(2000, ge=1, description="Intervals one usage report may carry.")
    max_interval_s: float = Field(
        86400.0, gt=0, description="Longest interval: the actor splits longer ones.")
    skew_s: float = Field(
        300.0, ge=0, description="Clock disagreement allowed at both ends of an interval.")
    overlap_tolerance_s: float = Field(
        0.001, ge=0, description="Overlap ignored between an instance's intervals (float noise).")

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

    # -- cross-checks ----------------------------------------------------------------------------
    observe_max_gap_s: float = Field(
        180.0, gt=0, description="Heartbeats further apart than this (and 3 heartbeat intervals) "
        "leave the time between them unobserved.")
    crosscheck_ratio: float = Field(
        0.10, gt=0, description="Reported vs heartbeat-observed instance time: flag beyond this.")
    crosscheck_slack_s: float = Field(
        300.0, ge=0, description="Differences below this many instance-seconds are never flagged.")
    report_window_s: float = Field(
        3600.0, gt=0, description="Heartbeats with instances and no report for this long: flag; "
        "a day's reported vs observed check waits this long after the day ends.")

    # -- admin queries -----------------------------------------------------------------------------
    page_limit: int = Field(1000, ge=1, description="Default rows per GET /admin/usage page.")
    max_page_limit: int = Field(10_000, ge=1, description="Largest rows per page.")
