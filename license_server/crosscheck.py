"""Usage rows per license and day, with the server's cross-checks as flags. Pure: the service
reads the database and the clock and passes both in.

What the server holds the customer's reports against:

- ``reported_short`` / ``reported_long``: reported instance-seconds differ from what heartbeats
  witnessed (their instance counts integrated over time) by more than the ratio and the slack.
  A day is judged once it has ended and the report window has passed, since reports trail
  heartbeats.
- ``over_cap_heartbeat``: heartbeats said more instances at once than the license allows.
- ``over_cap_reported``: reported intervals ran more instances at once than the license allows.
  Those seconds are billed as reported; the flag is for the vendor to act on.
- ``reports_missing`` (alert): a cluster's heartbeats said instances run, and no report has
  followed for longer than the report window.
- ``quarantined_reports`` (alert): the cluster's actor holds reports this server refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from license_contract import OVERLAP_TOLERANCE_S
from license_server.billing import (
    DAY,
    ConcurrencyByDay,
    Interval,
    day_index,
    day_name,
    parse_day,
    split_days,
)
from license_server.limits import ServerPolicy


def flag(code: str, reason: str) -> dict[str, str]:
    return {"code": code, "reason": reason}


def day_flags(row: dict[str, Any], *, cap: int | None, now: float,
              policy: ServerPolicy, day: int | None = None) -> list[dict[str, str]]:
    """The flags of one row; ``day`` is its day's index when the caller has it at hand."""
    flags = []
    if cap is not None and row["max_heartbeat_instances"] > cap:
        flags.append(flag("over_cap_heartbeat", f"heartbeats reported "
                          f"{row['max_heartbeat_instances']} instances at once; the cap is {cap}"))
    if cap is not None and row["max_concurrent_reported"] > cap:
        flags.append(flag("over_cap_reported", f"reported intervals ran "
                          f"{row['max_concurrent_reported']} instances at once; the cap is {cap}"))
    day_end = ((parse_day(row["day"]) if day is None else day) + 1) * DAY
    if now >= day_end + policy.report_window_s:
        reported, observed = row["instance_seconds"], row["observed_instance_seconds"]
        diff = reported - observed
        if abs(diff) > max(policy.crosscheck_ratio * observed, policy.crosscheck_slack_s):
            pct = f"{abs(diff) / observed:.1%}" if observed else "all of it"
            kind = "short" if diff < 0 else "long"
            flags.append(flag(f"reported_{kind}", f"reported {reported:.0f} instance-seconds, "
                              f"heartbeats witnessed {observed:.0f}: {pct} {kind}"))
    return flags


def cluster_alerts(license_id: str, clusters: list[dict[str, Any]], *, now: float,
                   policy: ServerPolicy) -> list[dict[str, Any]]:
    alerts = []
    for c in clusters:
        since = c.get("unreported_since")
        if since is not None and now - since > policy.report_window_s:
            alerts.append({"license_id": license_id, "cluster_id": c["cluster_id"],
                           "day": day_name(day_index(since)), **flag(
                               "reports_missing", f"heartbeats have reported running instances "
                               f"since {since:.0f}, and no usage report followed for "
                               f"{now - since:.0f} s")})
        if c.get("quarantined_reports"):
            alerts.append({"license_id": license_id, "cluster_id": c["cluster_id"],
                           "day": None, **flag(
                               "quarantined_reports", f"the cluster holds "
                               f"{c['quarantined_reports']} report(s) this server refused, "
                               f"{c['quarantined_seconds']:.0f} instance-seconds")})
    return alerts


def license_usage(license_id: str, cap: int | None, items: Iterable[Interval],
                  observed: list[dict[str, Any]], clusters: list[dict[str, Any]], *,
                  first_day: int, last_day: int, now: float, active_now: int,
                  policy: ServerPolicy) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows by day, alerts) for one license over days ``first_day..last_day``. ``items`` are
    its billed intervals touching that range, in order of start."""
    lo, hi = first_day * DAY, (last_day + 1) * DAY
    peaks = ConcurrencyByDay(OVERLAP_TOLERANCE_S)

    def fed() -> Iterator[Interval]:
        for it in items:
            peaks.add(it.start, it.end)
            yield it

    reported = split_days(fed(), lo, hi)
    seen = {parse_day(o["day"]): o for o in observed}
    alerts = cluster_alerts(license_id, clusters, now=now, policy=policy)
    rows = []
    for index in sorted(set(reported) | set(seen)):
        if not first_day <= index <= last_day:
            continue
        day = day_name(index)
        seconds, gpu_seconds = reported.get(index, (0.0, 0.0))
        o = seen.get(index, {})
        row: dict[str, Any] = {
            "license_id": license_id, "day": day,
            "instance_seconds": round(seconds, 3),
            "instance_hours": round(seconds / 3600, 6),
            "gpu_seconds": round(gpu_seconds, 3),
            "observed_instance_seconds": round(o.get("observed_seconds", 0.0), 3),
            "max_heartbeat_instances": o.get("max_instances", 0),
            "max_concurrent_reported": peaks.peak.get(day, 0),
            "active_instances_now": active_now,
        }
        row["flags"] = day_flags(row, cap=cap, now=now, policy=policy, day=index) + [
            {"code": a["code"], "reason": a["reason"]} for a in alerts if a["day"] == day]
        rows.append(row)
    return rows, alerts


USAGE_COLUMNS = ["license_id", "day", "instance_seconds", "instance_hours", "gpu_seconds",
                 "observed_instance_seconds", "max_heartbeat_instances",
                 "max_concurrent_reported", "active_instances_now", "flags"]


def csv_row(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "flags": "; ".join(f"{f['code']}: {f['reason']}" for f in row["flags"])}
