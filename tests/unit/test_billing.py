"""Billing arithmetic, pure: day splitting, interval checks, overlaps, heartbeat observation,
concurrency and the cross-check flags, all with the clock passed in."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from license_server.billing import (
    DAY,
    ConcurrencyByDay,
    Interval,
    Refusal,
    check_intervals,
    find_overlap,
    observe,
    parse_day,
    split_by_day,
)
from license_server.crosscheck import cluster_alerts, day_flags, license_usage
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


def test_observe_integrates_counts_between_heartbeats():
    assert observe(None, 0, T0, 3, 90) == {}
    assert observe(T0, 2, T0 + 30, 2, 90) == {time.strftime("%Y-%m-%d", time.gmtime(T0)): 60}
    assert observe(T0, 2, T0 + 91, 2, 90) == {}  # unobserved gap
    assert observe(T0, 2, T0 - 1, 2, 90) == {}  # out of order
    across = observe(T0 - 10, 1, T0 + 30, 3, 90)  # mean 2 over 40 s, split at midnight
    assert sorted(across.values()) == [20, 60]


def test_concurrency_counts_running_at_once_not_chained():
    peaks = ConcurrencyByDay(tolerance=0.001)
    for start, end in [(T0, T0 + 10), (T0 + 10, T0 + 20), (T0 + 5, T0 + 30),
                       (T0 + 6, T0 + 7), (T0 + DAY, T0 + DAY + 1), (math.nan, T0)]:
        peaks.add(start, end)
    assert list(peaks.peak.values()) == [3, 1]


def row(day_index, reported, observed, hb=1, conc=1):
    return {"day": time.strftime("%Y-%m-%d", time.gmtime(day_index * DAY)),
            "instance_seconds": reported, "observed_instance_seconds": observed,
            "max_heartbeat_instances": hb, "max_concurrent_reported": conc}


def test_day_flags_short_long_and_over_cap():
    d = int(T0 // DAY)
    after = (d + 1) * DAY + POLICY.report_window_s
    codes = lambda r, now, cap=None: [f["code"] for f in day_flags(r, cap=cap, now=now,  # noqa: E731
                                                                     policy=POLICY)]
    assert codes(row(d, 0.8 * 2 * DAY, 2 * DAY), after) == ["reported_short"]
    assert codes(row(d, 1.2 * 2 * DAY, 2 * DAY), after) == ["reported_long"]
    assert codes(row(d, 0.95 * 2 * DAY, 2 * DAY), after) == []
    assert codes(row(d, 0.8 * 2 * DAY, 2 * DAY), after - 1) == []  # reports may still come
    assert codes(row(d, 100, 0), after) == []  # within the slack
    assert codes(row(d, 0, 0, hb=3, conc=3), after, cap=2) == ["over_cap_heartbeat",
                                                                "over_cap_reported"]
    assert codes(row(d, 0, 0, hb=2, conc=2), after, cap=2) == []


def test_alerts_for_missing_and_quarantined_reports():
    clusters = [{"cluster_id": "c1", "unreported_since": T0, "quarantined_reports": 0,
                 "quarantined_seconds": 0.0},
                {"cluster_id": "c2", "unreported_since": None, "quarantined_reports": 2,
                 "quarantined_seconds": 120.0}]
    late = cluster_alerts("lic", clusters, now=T0 + POLICY.report_window_s + 1, policy=POLICY)
    assert [(a["cluster_id"], a["code"]) for a in late] == [("c1", "reports_missing"),
                                                           ("c2", "quarantined_reports")]
    early = cluster_alerts("lic", clusters, now=T0 + 10, policy=POLICY)
    assert [a["code"] for a in early] == ["quarantined_reports"]


def test_license_usage_rows_join_reports_and_observations():
    d = int(T0 // DAY)
    day = time.strftime("%Y-%m-%d", time.gmtime(T0))
    items = [Interval("a", T0, T0 + 0.8 * DAY), Interval("b", T0 + 10, T0 + 20),
             Interval("c", T0 + 15, T0 + 25)]
    observed = [{"day": day, "observed_seconds": DAY, "max_instances": 3}]
    rows, alerts = license_usage("lic", 2, iter(items), observed, [], first_day=d, last_day=d,
                                 now=T0 + 3 * DAY, active_now=0, policy=POLICY)
    assert alerts == []
    (only,) = rows
    assert only["max_concurrent_reported"] == 3
    assert only["instance_seconds"] == 0.8 * DAY + 20
    assert [f["code"] for f in only["flags"]] == ["over_cap_heartbeat", "over_cap_reported",
                                                  "reported_short"]
