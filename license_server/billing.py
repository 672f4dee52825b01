"""Billing arithmetic, pure: days, interval checks, overlaps, heartbeat observation, concurrency.

Time is Unix seconds in the server's clock; a day is a UTC day. Nothing here reads a clock or a
database: the store passes in what it read and what ``now`` is.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

DAY = 86400.0
# Days the server can name: gmtime works far beyond, but nothing billable lies outside.
FIRST_DAY, LAST_DAY = 0, 2_000_000  # 1970-01-01 .. year 7445


@dataclass(frozen=True)
class Interval:
    instance_id: str
    start: float
    end: float
    gpus: float = 0.0


class Refusal(Exception):
    """A request that cannot be true: the route answers ``status`` with ``code``."""

    def __init__(self, message: str, code: str = "invalid_request", status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def day_index(t: float) -> int:
    return int(t // DAY)


def day_name(index: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(index * DAY))


def parse_day(text: str) -> int:
    """``YYYY-MM-DD`` to a day index; ValueError for anything else."""
    if len(text) != 10:
        raise ValueError(f"{text!r} is not a date (YYYY-MM-DD)")
    parsed = time.strptime(text, "%Y-%m-%d")
    index = day_index(float(int(_timegm(parsed))))
    if not FIRST_DAY <= index <= LAST_DAY:
        raise ValueError(f"{text} is outside 1970..{day_name(LAST_DAY)}")
    return index


def _timegm(t: time.struct_time) -> int:
    import calendar

    return calendar.timegm(t)


def split_by_day(items: Iterable[Interval], lo: float = -math.inf,
                 hi: float = math.inf) -> dict[str, dict[str, float]]:
    """Instance-seconds and GPU-seconds per UTC day of ``items`` clipped to [lo, hi)."""
    return {day_name(d): {"instance_seconds": v[0], "gpu_seconds": v[1]}
            for d, v in sorted(split_days(items, lo, hi).items())}


def split_days(items: Iterable[Interval], lo: float = -math.inf,
               hi: float = math.inf) -> dict[int, list[float]]:
    """[instance-seconds, GPU-seconds] per day index of ``items`` clipped to [lo, hi).

    Costs O(intervals + days present): an interval's whole days are one entry in a difference
    table, and runs of days with the same count of whole intervals are walked only where that
    count is non-zero. Non-finite or empty intervals contribute nothing.
    """
    partial: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    whole: dict[int, list[float]] = defaultdict(lambda: [0, 0.0])
    for it in items:
        if not (math.isfinite(it.start) and math.isfinite(it.end) and math.isfinite(it.gpus)):
            continue  # the routes refuse them; a sum must not turn into NaN all the same
        start, end = max(it.start, lo, FIRST_DAY * DAY), min(it.end, hi, (LAST_DAY + 1) * DAY)
        if end <= start:
            continue
        d0, d1 = day_index(start), day_index(end)
        if d0 == d1:
            _add(partial[d0], end - start, it.gpus)
            continue
        _add(partial[d0], (d0 + 1) * DAY - start, it.gpus)
        if end > d1 * DAY:
            _add(partial[d1], end - d1 * DAY, it.gpus)
        if d1 > d0 + 1:  # whole days d0+1 .. d1-1
            whole[d0 + 1][0] += 1
            whole[d0 + 1][1] += it.gpus
            whole[d1][0] -= 1
            whole[d1][1] -= it.gpus
    totals: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for day, (secs, gpu_secs) in partial.items():
        totals[day][0] += secs
        totals[day][1] += gpu_secs
    keys = sorted(whole)
    count, gpus = 0, 0.0
    for key, following in zip(keys, keys[1:], strict=False):
        count += int(whole[key][0])
        gpus += whole[key][1]
        if count > 0:
            for day in range(key, following):
                totals[day][0] += count * DAY
                totals[day][1] += gpus * DAY
    return totals


def _add(acc: list[float], seconds: float, gpus: float) -> None:
    acc[0] += seconds
    acc[1] += seconds * gpus


def check_intervals(items: list[Interval], *, lower: float, upper: float,
                    max_len: float) -> None:
    """Raise Refusal for the first interval that cannot be true: it ends before it starts,
    starts before ``lower``, ends after ``upper`` or is longer than ``max_len``."""
    for n, it in enumerate(items):
        where = f"intervals[{n}] ({it.instance_id})"
        if not it.end > it.start:
            raise Refusal(f"{where}: end {it.end} is not after start {it.start}",
                          "interval_invalid")
        if it.start < lower:
            raise Refusal(f"{where}: starts at {it.start:.3f}, before this cluster could have "
                          f"run under the license (earliest {lower:.3f})", "interval_too_early")
        if it.end > upper:
            raise Refusal(f"{where}: ends at {it.end:.3f}, in the server's future (latest "
                          f"{upper:.3f}); stamp intervals in server time", "interval_in_future")
        if it.end - it.start > max_len:
            raise Refusal(f"{where}: {it.end - it.start:.0f} s long, above {max_len:.0f} s; "
                          "split longer intervals", "interval_too_long")


def find_overlap(new: list[Interval], billed: Iterable[Interval], tolerance: float) -> str | None:
    """The first overlap (by more than ``tolerance``) of a new interval with another new one or
    with one already billed, for the same instance; None when there is none. Overlaps among
    billed intervals are not the new report's doing and are ignored."""
    by_instance: dict[str, list[tuple[float, float, bool]]] = defaultdict(list)
    for it in new:
        by_instance[it.instance_id].append((it.start, it.end, True))
    for it in billed:
        if it.instance_id in by_instance:
            by_instance[it.instance_id].append((it.start, it.end, False))
    for instance, items in by_instance.items():
        items.sort()
        end_new = end_billed = -math.inf
        for start, end, is_new in items:
            reach = max(end_new, end_billed) if is_new else end_new
            if start < reach - tolerance:
                what = ("seconds already billed" if not is_new or end_billed > start + tolerance
                        else "another interval of this report")
                return f"instance {instance}: an interval near {start:.3f} overlaps {what}"
            if is_new:
                end_new = max(end_new, end)
            else:
                end_billed = max(end_billed, end)
    return None


def observe(prev_at: float | None, prev_instances: int, now: float, instances: int,
            max_gap: float) -> dict[str, float]:
    """Instance-seconds per day that two consecutive heartbeats of a cluster witness: the mean
    of their counts over the time between them. Heartbeats further apart than ``max_gap`` (or
    out of order) witness nothing: the server did not see that stretch."""
    if prev_at is None or not 0 < now - prev_at <= max_gap:
        return {}
    weight = (prev_instances + instances) / 2
    days = split_by_day([Interval("", prev_at, now, gpus=weight)])
    return {day: v["gpu_seconds"] for day, v in days.items()}


class ConcurrencyByDay:
    """Most intervals running at once, per day, fed intervals in order of start. Memory is the
    number running at once; touching intervals (end == next start) are not concurrent."""

    def __init__(self, tolerance: float = 0.0) -> None:
        self._tolerance = tolerance
        self._ends: list[float] = []
        self.peak: dict[str, int] = {}

    def add(self, start: float, end: float) -> None:
        if not (math.isfinite(start) and math.isfinite(end)) or end <= start:
            return
        while self._ends and self._ends[0] <= start + self._tolerance:
            heapq.heappop(self._ends)
        heapq.heappush(self._ends, end)
        if FIRST_DAY <= day_index(start) <= LAST_DAY:
            day = day_name(day_index(start))
            self.peak[day] = max(self.peak.get(day, 0), len(self._ends))
