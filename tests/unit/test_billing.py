"""Billing arithmetic, pure: day splitting, interval checks, overlaps, what heartbeats witness,
how far reports cover it, concurrency and the cross-check flags, all with the clock passed in."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from license_server.billing import (
    DAY,
    HOUR,
    Beat,
    ConcurrencyByDay,
    Coverage,
    Interval,
    Refusal,
    check_intervals,
    find_overlap,
    parse_day,
    reach,
    reported_to,
    seen_running,
    split_by_day,
    split_hours,
    witness,
)
from license_server.crosscheck import LicenseFacts, cluster_alerts, flag_text, license_usage
from license_server.limits import ServerPolicy

T0 = 1_800_000_000.0 - (1_800_000_000.0 % DAY)  # a UTC midnight
POLICY = ServerPolicy()


def naive_split(items):
    """The old per-day walk, as the reference."""
    out = {}
    for it in items:
        start = it.start
        while start < it.end:
            end = min(it.end, (start // DAY + 1) * DAY)
            day = time.strftime("%Y-%m-%d", time.gmtime(start))
            acc = out.setdefault(day, [0.0, 0.0])
            acc[0] += end - start
            acc[1] += (end - start) * it.gpus
            start = end
    return out


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.floats(0, 20 * DAY), st.floats(1, 9 * DAY),
                          st.sampled_from([0.0, 1.0, 2.5])), max_size=12))
def test_split_by_day_matches_the_per_day_walk(spans):
    items = [Interval("i", T0 + s, T0 + s + d, g) for s, d, g in spans]
    got = split_by_day(items)
    want = naive_split(items)
    assert sorted(got) == sorted(want)
    for day, (secs, gpu_secs) in want.items():
        assert math.isclose(got[day]["instance_seconds"], secs, rel_tol=1e-9, abs_tol=1e-6)
        assert math.isclose(got[day]["gpu_seconds"], gpu_secs, rel_tol=1e-9, abs_tol=1e-6)


def lines_run(*args, **kwargs) -> int:
    """The work ``split_by_day(*args, **kwargs)`` does, in lines of the license server's code."""
    import license_server
    from tests.work import counting_lines

    with counting_lines(license_server) as count:
        split_by_day(*args, **kwargs)
    return count.lines


def test_split_by_day_ignores_non_finite_and_costs_days_present():
    assert split_by_day([Interval("a", T0, math.inf), Interval("a", math.nan, T0),
                         Interval("a", T0, T0 + 1, math.inf)]) == {}
    # 56 years from 1970: only the range asked for is walked.
    clipped = dict(lo=T0 - DAY, hi=T0 + DAY)
    days = split_by_day([Interval("a", 0.0, T0 + 10)], **clipped)
    assert {d: v["instance_seconds"] for d, v in days.items()} == {
        time.strftime("%Y-%m-%d", time.gmtime(T0 - DAY)): DAY,
        time.strftime("%Y-%m-%d", time.gmtime(T0)): 10}
    assert lines_run([Interval("a", 0.0, T0 + 10)], **clipped) <= lines_run(
        [Interval("a", T0 - DAY, T0 + 10)])
    # The days between intervals cost nothing, however many.
    near = [Interval("a", T0, T0 + 1), Interval("b", T0 + 10 * DAY, T0 + 10 * DAY + 5)]
    far = [Interval("a", T0, T0 + 1), Interval("b", T0 + 1e6 * DAY, T0 + 1e6 * DAY + 5)]
    assert lines_run(far) == lines_run(near)
    # 1e15 is past the last day the server names: no more work than an empty interval.
    beyond = [Interval("a", T0, T0 + 1), Interval("b", 1e15, 1e15 + 5)]
    assert len(split_by_day(beyond)) == 1
    assert lines_run(beyond) == lines_run([Interval("a", T0, T0 + 1), Interval("b", T0, T0)])


def test_parse_day():
    assert parse_day("1970-01-02") == 1
    for bad in ("2026-13-01", "2026-1-1", "yesterday", "99999-01-01", ""):
        with pytest.raises(ValueError):
            parse_day(bad)


@pytest.mark.parametrize("item, code", [
    (Interval("a", T0 + 10, T0 + 10), "interval_invalid"),
    (Interval("a", T0 + 10, T0 + 5), "interval_invalid"),
    (Interval("a", T0 - 1000, T0 + 5), "interval_too_early"),
    (Interval("a", T0 + 10, T0 + 2 * DAY + 1), "interval_in_future"),
    (Interval("a", T0 + 10, T0 + DAY + 11), "interval_too_long"),
])
def test_check_intervals_refuses_what_cannot_be(item, code):
    with pytest.raises(Refusal) as err:
        check_intervals([Interval("ok", T0, T0 + 1), item], lower=T0 - 300,
                        upper=T0 + 2 * DAY, max_len=DAY)
    assert err.value.code == code and "intervals[1]" in str(err.value)


def test_check_intervals_accepts_the_bounds():
    check_intervals([Interval("a", T0 - 300, T0 - 300 + DAY)], lower=T0 - 300,
                    upper=T0 - 300 + DAY, max_len=DAY)


def test_overlaps_within_a_report_and_with_billed_seconds():
    billed = [Interval("a", T0, T0 + 100), Interval("b", T0, T0 + 100)]
    chained = [Interval("a", T0 + 100, T0 + 200), Interval("a", T0 + 200, T0 + 300)]
    assert find_overlap(chained, billed, 0.001) is None  # touching is fine
    assert find_overlap([Interval("a", T0 + 99.9995, T0 + 150)], billed, 0.001) is None
    assert "already billed" in find_overlap([Interval("a", T0 + 50, T0 + 150)], billed, 0.001)
    assert "already billed" in find_overlap([Interval("a", T0 - 50, T0 + 500)], billed, 0.001)
    inside = find_overlap([Interval("c", T0, T0 + 10), Interval("c", T0 + 5, T0 + 20)], [], 0)
    assert "another interval" in inside
    # Billed intervals overlapping each other (an old database) are not the report's fault.
    assert find_overlap([Interval("a", T0 + 200, T0 + 300)],
                        billed + [Interval("a", T0 + 50, T0 + 60)], 0) is None


def test_heartbeats_witness_the_lower_count_over_any_gap():
    h0 = int(T0 // HOUR)
    assert witness(None, Beat(T0, 3, 0.0), 180).hours == {}
    assert witness(Beat(T0, 2, 4.0), Beat(T0 + 30, 2, 4.0), 180).hours == {h0: [60, 120]}
    # However long the gap, it counts (at the lower count), and it is slow.
    long = witness(Beat(T0, 8, 8.0), Beat(T0 + 2 * HOUR, 8, 2.0), 180)
    assert long.hours == {h0: [8 * HOUR, 2 * HOUR], h0 + 1: [8 * HOUR, 2 * HOUR]}
    assert (long.gap_s, long.slow, long.running_from) == (2 * HOUR, True, T0)
    assert not witness(Beat(T0, 2, 0.0), Beat(T0 + 180, 2, 0.0), 180).slow
    # After a clean stop and a slow gap (the cluster was down), or out of order, nothing; a
    # "stop" followed at once by more heartbeats is counted; scaling from 0 starts the running.
    assert witness(Beat(T0, 2, 0.0, stopping=True), Beat(T0 + 9 * HOUR, 2, 0.0), 180).hours == {}
    assert witness(Beat(T0, 2, 0.0, stopping=True), Beat(T0 + 30, 2, 0.0), 180).hours == {
        h0: [60, 0]}
    assert witness(Beat(T0, 2, 0.0), Beat(T0 - 1, 2, 0.0), 180).hours == {}
    up = witness(Beat(T0, 0, 0.0), Beat(T0 + 30, 3, 0.0), 180)
    assert (up.hours, up.running_from) == ({}, T0 + 30)
    assert split_hours(T0 - 10, T0 + 30) == {h0 - 1: 10, h0: 30}


def test_reports_cover_what_heartbeats_saw_only_without_holes():
    tol = 5.0
    cov = seen_running(Coverage(), T0, T0 + 600, tol)
    assert (cov.unreported_since, cov.seen_until) == (T0, T0 + 600)
    # Spans that reach the frontier extend it; one past a hole does not.
    assert reach(T0, [(T0 - 30, T0 + 100), (T0 + 103, T0 + 200), (T0 + 300, T0 + 600)],
                 tol) == T0 + 200
    part = reported_to(cov, T0 + 200, tol)
    assert (part.unreported_since, part.covered_until) == (T0 + 200, T0 + 200)
    done = reported_to(part, T0 + 598, tol)
    assert done.unreported_since is None
    # Running seen beyond what is covered is unreported from the end of the coverage.
    later = seen_running(done, T0 + 570, T0 + 900, tol)
    assert later.unreported_since == T0 + 598
    # A frontier nothing reaches moves nothing.
    assert reported_to(later, later.unreported_since, tol) == later


def test_concurrency_counts_running_at_once_not_chained():
    peaks = ConcurrencyByDay(tolerance=0.001)
    for start, end, gpus in [(T0, T0 + 10, 1), (T0 + 10, T0 + 20, 1), (T0 + 5, T0 + 30, 2),
                             (T0 + 6, T0 + 7, 0.5), (T0 + DAY, T0 + DAY + 1, 4),
                             (math.nan, T0, 1)]:
        peaks.add(start, end, gpus)
    assert list(peaks.peak.values()) == [3, 1]
    assert list(peaks.peak_gpus.values()) == [3.5, 4]


def facts(**kw):
    return LicenseFacts(**{"license_id": "lic", "max_instances": None, "max_gpus": None, **kw})


def hours(day_index, seconds_per_hour, gpu_seconds_per_hour=0.0, n=24):
    return [{"hour": day_index * 24 + h, "observed_seconds": seconds_per_hour,
             "observed_gpu_seconds": gpu_seconds_per_hour} for h in range(n)]


def codes(rows):
    return [[f["code"] for f in r["flags"]] for r in rows]


def test_days_are_judged_hour_by_hour_once_their_reports_are_in():
    d = int(T0 // DAY)
    # 2 instances all day, each reported until 19:12 only.
    items = [Interval(i, T0, T0 + 0.8 * DAY) for i in ("a", "b")]
    f = facts(hours=hours(d, 2 * HOUR))

    def usage(now):
        (row,) = license_usage(f, iter(items), first_day=d, last_day=d, now=now, active_now=0,
                               policy=POLICY)[0]
        return row

    # At 02:30 the first hour is judged, and all of it was reported.
    early = usage(T0 + 2.5 * HOUR)
    assert early["checked_until"] == T0 + HOUR and codes([early]) == [[]]
    late = usage(T0 + 23 * HOUR)  # judged until 22:00, reported until 19:12
    assert late["checked_until"] == T0 + 22 * HOUR
    assert codes([late]) == [["reported_short", "reported_short_window"]]
    assert late["flags"][0]["evidence"] == {
        "reported_instance_seconds": 2 * 0.8 * DAY, "observed_instance_seconds": 2 * 22 * HOUR,
        "checked_until": T0 + 22 * HOUR}
    done = usage(T0 + DAY + POLICY.report_window_s)
    assert done["checked_until"] == T0 + DAY
    assert "20.0% short" in done["flags"][0]["reason"]


def test_a_small_shortfall_is_caught_over_the_window():
    d = int(T0 // DAY)
    days = 30
    # One instance for 30 days, 5 % of it never reported: under the day's 10 %.
    items = [Interval("a", T0 + k * DAY, T0 + k * DAY + 0.95 * DAY) for k in range(days)]
    f = facts(hours=[h for k in range(days) for h in hours(d + k, HOUR)])
    now = T0 + days * DAY + HOUR
    rows, _ = license_usage(f, iter(items), first_day=d, last_day=d + days - 1, now=now,
                            active_now=0, policy=POLICY)
    assert codes(rows) == [["reported_short_window"]] * days
    last = rows[-1]["flags"][0]
    assert last["evidence"]["window_days"] == 30
    assert last["evidence"]["observed_instance_seconds"] == days * DAY
    assert math.isclose(last["evidence"]["reported_instance_seconds"], 0.95 * days * DAY)
    # Asked for the last day only, the window still reaches back 30 days.
    (only,), _ = license_usage(f, iter(items), first_day=d + days - 1, last_day=d + days - 1,
                               now=now, active_now=0, policy=POLICY)
    assert only["flags"][0]["evidence"] == last["evidence"]


def test_gpu_seconds_and_caps_are_checked_like_instances():
    d = int(T0 // DAY)
    items = [Interval("a", T0, T0 + DAY, gpus=0.0), Interval("b", T0, T0 + DAY, gpus=3.0)]
    f = facts(max_instances=4, max_gpus=2.0, hours=hours(d, 2 * HOUR, 8 * HOUR),
              days=[{"day": time.strftime("%Y-%m-%d", time.gmtime(T0)), "max_instances": 2,
                     "max_gpus": 8.0, "heartbeats": 100, "refused_clusters": 0}])
    (row,), _ = license_usage(f, iter(items), first_day=d, last_day=d, now=T0 + 2 * DAY,
                              active_now=0, policy=POLICY)
    assert (row["max_heartbeat_gpus"], row["max_concurrent_reported_gpus"]) == (8.0, 3.0)
    assert codes([row]) == [["over_cap_gpus_heartbeat", "over_cap_gpus_reported",
                             "gpu_reported_short"]]
    gpu = row["flags"][2]["evidence"]
    assert (gpu["reported_gpu_seconds"], gpu["observed_gpu_seconds"]) == (3 * DAY, 8 * DAY)


def test_alerts_for_missing_silent_and_quarantined():
    clusters = [{"cluster_id": "c1", "activated_at": T0, "unreported_since": T0,
                 "covered_until": None, "seen_until": T0 + 60, "last_heartbeat_at": T0 + 60,
                 "stopped": True, "instances": 2, "quarantined_reports": 0,
                 "quarantined_seconds": 0.0},
                {"cluster_id": "c2", "activated_at": T0, "unreported_since": None,
                 "last_heartbeat_at": T0, "stopped": False, "instances": 3, "gpus": 1.0,
                 "quarantined_reports": 2, "quarantined_seconds": 120.0}]
    late = cluster_alerts("lic", clusters, now=T0 + POLICY.report_window_s + 1, policy=POLICY,
                          silent_after_s=150)
    assert [(a["cluster_id"], a["code"]) for a in late] == [
        ("c1", "reports_missing"), ("c2", "cluster_silent"), ("c2", "quarantined_reports")]
    day = time.strftime("%Y-%m-%d", time.gmtime(T0))
    assert all(a["license_id"] == "lic" for a in late)
    assert [a["day"] for a in late] == [day, day, None]
    assert late[1]["evidence"]["silent_s"] == POLICY.report_window_s + 1
    assert flag_text(late[2]) == ("quarantined_reports (cluster c2; reports=2, "
                                  "instance_seconds=120.0): the cluster holds 2 report(s) this "
                                  "server refused, 120 instance-seconds")
    early = cluster_alerts("lic", clusters, now=T0 + 10, policy=POLICY, silent_after_s=150)
    assert [a["code"] for a in early] == ["quarantined_reports"]
    # A revoked or expired license's clusters are expected to go quiet.
    ended = cluster_alerts("lic", clusters, now=T0 + 1000, policy=POLICY, active=False,
                           silent_after_s=150)
    assert "cluster_silent" not in [a["code"] for a in ended]


def test_slow_heartbeats_and_churn_are_flagged_with_their_cluster_and_evidence():
    d = int(T0 // DAY)
    day = time.strftime("%Y-%m-%d", time.gmtime(T0))
    f = facts(
        clusters=[{"cluster_id": f"c{n}", "activated_at": T0 + n, "last_heartbeat_at": None}
                  for n in range(POLICY.max_new_clusters_per_day)],
        days=[{"day": day, "max_instances": 1, "max_gpus": 0.0, "heartbeats": 9,
               "refused_clusters": 3}],
        cluster_days=[{"cluster_id": "c1", "day": day, "heartbeats": 9, "slow_gaps": 8,
                       "longest_gap_s": 300.0, "slow_after_s": 180.0}])
    (row,), _ = license_usage(f, iter([]), first_day=d, last_day=d, now=T0 + 600,
                              active_now=0, policy=POLICY)
    slow, churn = row["flags"]
    assert (slow["code"], slow["cluster_id"], slow["day"]) == ("heartbeats_slow", "c1", day)
    assert slow["evidence"] == {"slow_gaps": 8, "longest_gap_s": 300.0, "limit_s": 180.0,
                                "heartbeats": 9}
    assert (churn["code"], churn["cluster_id"]) == ("cluster_churn", None)
    assert churn["evidence"] == {"new_clusters": POLICY.max_new_clusters_per_day,
                                 "refused_clusters": 3,
                                 "limit": POLICY.max_new_clusters_per_day}


def test_license_usage_rows_join_reports_and_observations():
    d = int(T0 // DAY)
    day = time.strftime("%Y-%m-%d", time.gmtime(T0))
    items = [Interval("a", T0, T0 + 0.8 * DAY), Interval("b", T0 + 10, T0 + 20),
             Interval("c", T0 + 15, T0 + 25)]
    f = facts(max_instances=2, hours=hours(d, HOUR),
              days=[{"day": day, "max_instances": 3, "max_gpus": 0.0, "heartbeats": 2880,
                     "refused_clusters": 0}])
    rows, alerts = license_usage(f, iter(items), first_day=d, last_day=d, now=T0 + 3 * DAY,
                                 active_now=0, policy=POLICY)
    assert alerts == []
    (only,) = rows
    assert only["max_concurrent_reported"] == 3
    assert only["instance_seconds"] == 0.8 * DAY + 20
    assert [f["code"] for f in only["flags"]] == ["over_cap_heartbeat", "over_cap_reported",
                                                  "reported_short", "reported_short_window"]
    assert all((f["license_id"], f["day"]) == ("lic", day) for f in only["flags"])
