"""The tenants benchmark's arithmetic (``serve_app.bench.tenants``): the overshoot against the
limit's bound and rate, and the side-by-side ratios."""

from __future__ import annotations

import math

import pytest

from serve_app.bench.tenants import overshoot, ratio


def test_a_limit_spent_at_once_then_at_its_rate_is_exactly_the_bound():
    # 60 a minute for 120 s: the minute's bucket at t=0, then one a second.
    admitted = [0.0] * 60 + [float(t) for t in range(1, 121)]
    row = overshoot(admitted, 60, 120)
    assert row["bound"] == 180 and row["over_bound"] == 0
    assert row["steady_rate_per_min"] == pytest.approx(61)  # t = 60..120 inclusive
    assert row["over_rate"] == pytest.approx(61 / 60 - 1)


def test_overshoot_is_relative():
    assert overshoot([1.0] * 198, 60, 120)["over_bound"] == pytest.approx(0.1)
    assert "over_rate" not in overshoot([1.0], 60, 30)


def test_ratios_of_medians():
    assert ratio([1, 2, 3], [2, 4, 6]) == 0.5
    assert math.isnan(ratio([], [1]))
