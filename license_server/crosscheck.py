"""Usage rows per license and day, with the server's cross-checks as flags. Pure: the service
reads the database and the clock and passes both in.

Every flag names its license, its cluster (None where it is about the license as a whole), its
day (None where it has none) and its evidence (the numbers it was judged on), with a sentence
for people. What the server holds the customer's reports against:

- ``reported_short`` / ``reported_long``: reported instance-seconds differ from what heartbeats
  witnessed (their instance counts integrated over time) by more than the ratio and the slack.
  ``gpu_reported_short`` / ``_long``: the same for GPU-seconds. Only hours that ended at least
  the report window ago are judged (reports trail heartbeats), so a day is checked hour by hour
  as it goes, not only once it has ended.
- ``reported_short_window``: the same check over the window's days (30), with a tighter ratio:
  a shortfall too small to flag in a day adds up over a month.
- ``over_cap_heartbeat`` / ``over_cap_gpus_heartbeat``: heartbeats said more instances (GPUs)
  at once than the license allows. ``over_cap_reported`` / ``over_cap_gpus_reported``:
  reported intervals ran more at once. Those seconds are billed as reported; the flag is for
  the vendor to act on.
- ``heartbeats_slow`` (per cluster): gaps between a cluster's heartbeats longer than the
  license's interval by the policy's margin. The gap is still counted, at the lower of the two
  heartbeats' counts.
- ``cluster_churn``: more new cluster ids in a day than the policy allows (those refused for
  the cluster cap included).
- ``reports_missing`` (alert, per cluster): heartbeats saw instances running, and reports have
  not covered that time for longer than the report window.
- ``cluster_silent`` (alert, per cluster): a cluster of an active license stopped heartbeating
  without saying it stops.
- ``quarantined_reports`` (alert, per cluster): the cluster's actor holds reports this server
  refused.
- ``bundle_overdue`` (alert, per air-gapped installation): the lease last answered to it has run
  out and no usage bundle renewed it. An air-gapped installation's beats are observed from its
  bundles like heartbeats, so the checks above hold for it too (its caps, slow gaps for time
  with no entries, reports against beats); it is overdue rather than silent.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from license_contract import OVERLAP_TOLERANCE_S
from license_server.billing import (
    DAY,
    FIRST_DAY,
    HOUR,
    ConcurrencyByDay,
    Interval,
    day_index,
    day_name,
    hour_index,
    parse_day,
    split_days,
)
from license_server.limits import ServerPolicy

# Caps on GPUs are fractional (a replica may hold half a GPU): float noise is not over the cap.
_GPU_EPSILON = 1e-9


def flag(code: str, license_id: str, day: str | None, reason: str, cluster_id: str | None = None,
         **evidence: Any) -> dict[str, Any]:
    return {"code": code, "license_id": license_id, "cluster_id": cluster_id, "day": day,
            "reason": reason, "evidence": {k: _number(v) for k, v in evidence.items()}}


def _number(v: Any) -> Any:
    return round(v, 3) if isinstance(v, float) else v


@dataclass(frozen=True)
class LicenseFacts:
    """What the store holds about one license, as the usage page needs it."""

    license_id: str
    max_instances: int | None
    max_gpus: float | None
    active: bool = True  # neither revoked nor expired
    silent_after_s: float = math.inf
    clusters: list[dict[str, Any]] = field(default_factory=list)
    # heartbeat_days rows: day, max_instances, max_gpus, heartbeats, refused_clusters
    days: list[dict[str, Any]] = field(default_factory=list)
    # heartbeat_hours rows: hour (index), observed_seconds, observed_gpu_seconds
    hours: list[dict[str, Any]] = field(default_factory=list)
    # cluster_days rows: cluster_id, day, heartbeats, slow_gaps, longest_gap_s, slow_after_s
    cluster_days: list[dict[str, Any]] = field(default_factory=list)


def _differs(reported: float, observed: float, ratio: float, slack: float) -> str | None:
    diff = reported - observed
    if abs(diff) > max(ratio * observed, slack):
        return "short" if diff < 0 else "long"
    return None


def _pct(reported: float, observed: float) -> str:
    return f"{abs(reported - observed) / observed:.1%}" if observed else "all of it"


def cluster_alerts(license_id: str, clusters: list[dict[str, Any]], *, now: float,
                   policy: ServerPolicy, active: bool = True,
                   silent_after_s: float = math.inf) -> list[dict[str, Any]]:
    alerts = []
    for c in clusters:
        cid = c["cluster_id"]
        since = c.get("unreported_since")
        if since is not None and now - since > policy.report_window_s:
            alerts.append(flag(
                "reports_missing", license_id, day_name(day_index(since)),
                f"heartbeats saw instances running since {since:.0f}, and no usage report has "
                f"covered that time for {now - since:.0f} s", cid,
                unreported_since=float(since), covered_until=c.get("covered_until"),
                seen_until=c.get("seen_until"), waited_s=float(now - since),
                limit_s=policy.report_window_s))
        last = c.get("last_heartbeat_at")
        if active and last is not None and not c.get("stopped") and now - last > silent_after_s:
            alerts.append(flag(
                "cluster_silent", license_id, day_name(day_index(last)),
                f"no heartbeat for {now - last:.0f} s (limit {silent_after_s:.0f} s) on an active "
                f"license; its last one said {c.get('instances', 0)} instances and did not say "
                "it stops", cid, last_heartbeat_at=float(last), silent_s=float(now - last),
                limit_s=float(silent_after_s), instances=c.get("instances", 0),
                gpus=float(c.get("gpus") or 0.0)))
        if c.get("quarantined_reports"):
            alerts.append(flag(
                "quarantined_reports", license_id, None,
                f"the cluster holds {c['quarantined_reports']} report(s) this server refused, "
                f"{c['quarantined_seconds']:.0f} instance-seconds", cid,
                reports=c["quarantined_reports"],
                instance_seconds=float(c["quarantined_seconds"])))
    return alerts


def overdue_alerts(license_id: str, installations: list[dict[str, Any]], *,
                   now: float) -> list[dict[str, Any]]:
    """Air-gapped installations whose last lease ran out with no bundle carried in since."""
    alerts = []
    for i in installations:
        expired = i["lease_expires_at"]
        if now < expired:
            continue
        last = i.get("last_bundle_at")
        alerts.append(flag(
            "bundle_overdue", license_id, day_name(day_index(expired)),
            f"no usage bundle since {'activation' if last is None else f'{last:.0f}'}; the "
            f"installation's lease ran out {now - expired:.0f} s ago", i["installation_id"],
            last_bundle_at=last, last_entry_at=i.get("last_entry_at"),
            lease_expires_at=float(expired), overdue_s=float(now - expired),
            bundles=i.get("bundles", 0)))
    return alerts


def license_usage(facts: LicenseFacts, items: Iterable[Interval], *, first_day: int,
                  last_day: int, now: float, active_now: int,
                  policy: ServerPolicy) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows by day, alerts) for one license over days ``first_day..last_day``. ``items`` are
    its billed intervals touching that range and the window's days before it, in order of
    start; ``facts.hours`` covers the same days."""
    lid = facts.license_id
    lo_day = max(first_day - (policy.window_days - 1), FIRST_DAY)
    lo, hi = lo_day * DAY, (last_day + 1) * DAY
    # Hours that ended a report window ago are judged: their reports are in.
    checked = hour_index(now - policy.report_window_s) * HOUR
    partial_day = day_index(checked)
    partial_lo = partial_day * DAY
    partial = [0.0, 0.0]  # reported in [partial_lo, checked)
    peaks = ConcurrencyByDay(OVERLAP_TOLERANCE_S)

    def fed() -> Iterator[Interval]:
        for it in items:
            peaks.add(it.start, it.end, it.gpus)
            if math.isfinite(it.start) and math.isfinite(it.end) and math.isfinite(it.gpus):
                start, end = max(it.start, partial_lo, lo), min(it.end, checked, hi)
                if end > start:
                    partial[0] += end - start
                    partial[1] += (end - start) * it.gpus
            yield it

    reported = split_days(fed(), lo, hi)
    checked_hour = hour_index(checked)
    observed: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for h in facts.hours:
        acc = observed[h["hour"] // 24]
        acc[0] += h["observed_seconds"]
        acc[1] += h["observed_gpu_seconds"]
        if h["hour"] < checked_hour:
            acc[2] += h["observed_seconds"]
            acc[3] += h["observed_gpu_seconds"]

    def judged(d: int) -> tuple[float, float, float, float] | None:
        """(reported, reported GPU, observed, observed GPU) seconds of day ``d`` that can be
        judged now; None when none of it can."""
        if d > partial_day or (d == partial_day and checked <= partial_lo):
            return None
        o = observed.get(d, [0.0] * 4)
        if d < partial_day:
            r = reported.get(d, [0.0, 0.0])
            return r[0], r[1], o[0], o[1]
        return partial[0], partial[1], o[2], o[3]

    # Running sums over judged days, for the window check.
    judged_days = sorted(d for d in set(reported) | set(observed) if judged(d) is not None)
    sums_r, sums_o = [0.0], [0.0]
    for d in judged_days:
        j = judged(d)
        assert j is not None
        sums_r.append(sums_r[-1] + j[0])
        sums_o.append(sums_o[-1] + j[2])

    beats = {parse_day(r["day"]): r for r in facts.days}
    slow: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in facts.cluster_days:
        if r["slow_gaps"]:
            slow[parse_day(r["day"])].append(r)
    new_clusters: dict[int, int] = defaultdict(int)
    for c in facts.clusters:
        new_clusters[day_index(c["activated_at"])] += 1
    churn_days = {d for d in set(new_clusters) | set(beats)
                  if new_clusters.get(d, 0) + (beats.get(d) or {}).get("refused_clusters", 0)
                  > policy.max_new_clusters_per_day}

    alerts = cluster_alerts(lid, facts.clusters, now=now, policy=policy, active=facts.active,
                            silent_after_s=facts.silent_after_s)
    rows = []
    for index in sorted(set(reported) | set(observed) | set(beats) | set(slow) | churn_days):
        if not first_day <= index <= last_day:
            continue
        day = day_name(index)
        seconds, gpu_seconds = reported.get(index, (0.0, 0.0))
        o = observed.get(index, [0.0] * 4)
        b = beats.get(index, {})
        row: dict[str, Any] = {
            "license_id": lid, "day": day,
            "instance_seconds": round(seconds, 3),
            "instance_hours": round(seconds / 3600, 6),
            "gpu_seconds": round(gpu_seconds, 3),
            "observed_instance_seconds": round(o[0], 3),
            "observed_gpu_seconds": round(o[1], 3),
            "max_heartbeat_instances": b.get("max_instances", 0),
            "max_heartbeat_gpus": float(b.get("max_gpus", 0.0)),
            "max_concurrent_reported": peaks.peak.get(day, 0),
            "max_concurrent_reported_gpus": round(peaks.peak_gpus.get(day, 0.0), 3),
            "active_instances_now": active_now,
            "checked_until": None,
        }
        flags = _cap_flags(lid, day, row, facts)
        j = judged(index)
        if j is not None:
            until = min(checked, (index + 1) * DAY)
            row["checked_until"] = until
            flags += _judged_flags(lid, day, j, until, policy)
            n = bisect.bisect_right(judged_days, index)
            m = bisect.bisect_right(judged_days, index - policy.window_days)
            flags += _window_flags(lid, day, sums_r[n] - sums_r[m], sums_o[n] - sums_o[m],
                                   day_name(max(index - policy.window_days + 1, lo_day)),
                                   until, policy)
        for r in slow.get(index, []):
            flags.append(flag(
                "heartbeats_slow", lid, day,
                f"{r['slow_gaps']} gap(s) between heartbeats longer than {r['slow_after_s']:.0f} "
                f"s, the longest {r['longest_gap_s']:.0f} s", r["cluster_id"],
                slow_gaps=r["slow_gaps"], longest_gap_s=float(r["longest_gap_s"]),
                limit_s=float(r["slow_after_s"]), heartbeats=r["heartbeats"]))
        if index in churn_days:
            new, refused = new_clusters.get(index, 0), b.get("refused_clusters", 0)
            flags.append(flag(
                "cluster_churn", lid, day,
                f"{new} new cluster id(s) this day and {refused} refused for the cluster cap, "
                f"above {policy.max_new_clusters_per_day}", None, new_clusters=new,
                refused_clusters=refused, limit=policy.max_new_clusters_per_day))
        row["flags"] = flags + [a for a in alerts if a["day"] == day]
        rows.append(row)
    return rows, alerts


def _cap_flags(lid: str, day: str, row: dict[str, Any],
               facts: LicenseFacts) -> list[dict[str, Any]]:
    flags = []
    cap, gpu_cap = facts.max_instances, facts.max_gpus
    if cap is not None and row["max_heartbeat_instances"] > cap:
        flags.append(flag("over_cap_heartbeat", lid, day, f"heartbeats reported "
                          f"{row['max_heartbeat_instances']} instances at once; the cap is {cap}",
                          instances=row["max_heartbeat_instances"], cap=cap))
    if cap is not None and row["max_concurrent_reported"] > cap:
        flags.append(flag("over_cap_reported", lid, day, f"reported intervals ran "
                          f"{row['max_concurrent_reported']} instances at once; the cap is {cap}",
                          instances=row["max_concurrent_reported"], cap=cap))
    if gpu_cap is not None and row["max_heartbeat_gpus"] > gpu_cap + _GPU_EPSILON:
        flags.append(flag("over_cap_gpus_heartbeat", lid, day, f"heartbeats reported "
                          f"{row['max_heartbeat_gpus']:g} GPUs at once; the cap is {gpu_cap:g}",
                          gpus=row["max_heartbeat_gpus"], cap=gpu_cap))
    if gpu_cap is not None and row["max_concurrent_reported_gpus"] > gpu_cap + _GPU_EPSILON:
        flags.append(flag("over_cap_gpus_reported", lid, day, f"reported intervals held "
                          f"{row['max_concurrent_reported_gpus']:g} GPUs at once; the cap is "
                          f"{gpu_cap:g}", gpus=row["max_concurrent_reported_gpus"], cap=gpu_cap))
    return flags


def _judged_flags(lid: str, day: str, j: tuple[float, float, float, float], until: float,
                  policy: ServerPolicy) -> list[dict[str, Any]]:
    flags = []
    reported, reported_gpu, observed, observed_gpu = j
    for prefix, unit, evidence, got, seen in (
            ("", "instance-seconds", "instance_seconds", reported, observed),
            ("gpu_", "GPU-seconds", "gpu_seconds", reported_gpu, observed_gpu)):
        kind = _differs(got, seen, policy.crosscheck_ratio, policy.crosscheck_slack_s)
        if kind:
            flags.append(flag(
                f"{prefix}reported_{kind}", lid, day, f"reported {got:.0f} {unit}, heartbeats "
                f"witnessed {seen:.0f}: {_pct(got, seen)} {kind}",
                **{f"reported_{evidence}": got, f"observed_{evidence}": seen},
                checked_until=until))
    return flags


def _window_flags(lid: str, day: str, reported: float, observed: float, since: str,
                  until: float, policy: ServerPolicy) -> list[dict[str, Any]]:
    if observed - reported <= max(policy.window_ratio * observed, policy.crosscheck_slack_s):
        return []
    return [flag(
        "reported_short_window", lid, day, f"from {since} to this day, reported {reported:.0f} "
        f"instance-seconds, heartbeats witnessed {observed:.0f}: {_pct(reported, observed)} "
        f"short (limit {policy.window_ratio:.0%} over {policy.window_days} days)",
        reported_instance_seconds=reported, observed_instance_seconds=observed,
        window_days=policy.window_days, window_from=since, checked_until=until,
        limit_ratio=policy.window_ratio)]


USAGE_COLUMNS = ["license_id", "day", "instance_seconds", "instance_hours", "gpu_seconds",
                 "observed_instance_seconds", "observed_gpu_seconds", "max_heartbeat_instances",
                 "max_heartbeat_gpus", "max_concurrent_reported", "max_concurrent_reported_gpus",
                 "active_instances_now", "checked_until", "flags"]


def flag_text(f: dict[str, Any]) -> str:
    """One flag on one line: code, cluster, evidence, reason (the CSV's flags column, the CLI's
    alerts)."""
    where = [f"cluster {f['cluster_id']}"] if f.get("cluster_id") else []
    evidence = ", ".join(f"{k}={v}" for k, v in f["evidence"].items())
    return f"{f['code']} ({'; '.join([*where, evidence])}): {f['reason']}"


def csv_row(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "flags": "; ".join(flag_text(f) for f in row["flags"])}
