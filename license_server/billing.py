"""Billing arithmetic, pure: days and hours, interval checks, overlaps, what heartbeats witness,
how far reports cover it, concurrency.

Time is Unix seconds in the server's clock; a day is a UTC day, an hour a UTC hour. Nothing here
reads a clock or a database: the store passes in what it read and what ``now`` is.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

DAY = 86400.0
HOUR = 3600.0
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


def hour_index(t: float) -> int:
    return int(t // HOUR)


def split_hours(start: float, end: float) -> dict[int, float]:
    """Seconds of [start, end) per hour index, within the days the server can name."""
    start, end = max(start, FIRST_DAY * DAY), min(end, (LAST_DAY + 1) * DAY)
    out: dict[int, float] = {}
    if not (math.isfinite(start) and math.isfinite(end)):
        return out
    while start < end:
        h = hour_index(start)
        stop = min(end, (h + 1) * HOUR)
        out[h] = out.get(h, 0.0) + stop - start
        start = stop
    return out


@dataclass(frozen=True)
class Beat:
    """One heartbeat of a cluster as the server keeps it: when, and what it said it runs."""

    at: float
    instances: int
    gpus: float
    stopping: bool = False


@dataclass(frozen=True)
class Witness:
    """What a heartbeat and the cluster's previous one witness together.

    ``hours``: hour index -> [instance-seconds, GPU-seconds]. ``running_from``: since when
    instances were seen running up to this heartbeat (None: none were). ``gap_s``: the time
    since the previous heartbeat (None: there is no previous one to measure from)."""

    hours: dict[int, list[float]]
    running_from: float | None
    gap_s: float | None
    slow: bool


def witness(prev: Beat | None, beat: Beat, slow_after_s: float) -> Witness:
    """The time between two consecutive heartbeats counts at the lower of their two counts
    (instances and GPUs alike), however long it is: heartbeating less often leaves no time
    unobserved, it only gets the gap flagged (``slow``, longer than ``slow_after_s``). Out of
    order, nothing is witnessed; nor after a heartbeat that said the cluster stops, when the
    next comes later than a slow gap (the cluster was down). One sooner counts as any other:
    saying "stop" and going on is no way out of being observed."""
    running_now = beat.at if beat.instances > 0 else None
    gap = beat.at - prev.at if prev is not None else 0.0
    if prev is None or not gap > 0 or (prev.stopping and gap > slow_after_s):
        return Witness({}, running_now, None, False)
    instances, gpus = min(prev.instances, beat.instances), min(prev.gpus, beat.gpus)
    hours: dict[int, list[float]] = {}
    if instances > 0 or gpus > 0:
        hours = {h: [s * instances, s * gpus] for h, s in split_hours(prev.at, beat.at).items()}
    return Witness(hours, prev.at if instances > 0 else running_now, gap, gap > slow_after_s)


@dataclass(frozen=True)
class Coverage:
    """How far a cluster's reports cover the running time its heartbeats saw.

    ``seen_until``: the last time heartbeats saw instances running. ``covered_until``: how far
    reported intervals reach. ``unreported_since``: the start of running time seen and not yet
    covered (None: everything seen is covered)."""

    unreported_since: float | None = None
    covered_until: float | None = None
    seen_until: float | None = None


def seen_running(cov: Coverage, running_from: float | None, at: float,
                 tolerance: float) -> Coverage:
    """``cov`` after a heartbeat at ``at`` that saw instances running since ``running_from``."""
    if running_from is None:
        return cov
    seen = at if cov.seen_until is None else max(cov.seen_until, at)
    since = cov.unreported_since
    if since is None and (cov.covered_until is None or cov.covered_until < at - tolerance):
        since = running_from if cov.covered_until is None else max(running_from, cov.covered_until)
    return Coverage(since, cov.covered_until, seen)


def reach(frontier: float, spans: Iterable[tuple[float, float]], tolerance: float) -> float:
    """How far ``spans`` (in order of start) cover time without a hole from ``frontier``: each
    span that starts by the reach so far (give or take ``tolerance``) extends it."""
    got = frontier
    for start, end in spans:
        if start > got + tolerance:
            break
        got = max(got, end)
    return got


def reported_to(cov: Coverage, reached: float, tolerance: float) -> Coverage:
    """``cov`` after reports reached ``reached`` (see ``reach``): what they covered is no longer
    unreported; running time seen beyond it still is."""
    covered = reached if cov.covered_until is None else max(cov.covered_until, reached)
    since = cov.unreported_since
    if since is not None and reached > since:
        seen = since if cov.seen_until is None else cov.seen_until
        since = None if covered >= seen - tolerance else covered
    return Coverage(since, covered, cov.seen_until)


class ConcurrencyByDay:
    """Most intervals running at once, and most GPUs they held at once, per day, fed intervals
    in order of start. Memory is the number running at once; touching intervals (end == next
    start) are not concurrent."""

    def __init__(self, tolerance: float = 0.0) -> None:
        self._tolerance = tolerance
        self._ends: list[tuple[float, float]] = []
        self._gpus = 0.0
        self.peak: dict[str, int] = {}
        self.peak_gpus: dict[str, float] = {}

    def add(self, start: float, end: float, gpus: float = 0.0) -> None:
        if not (math.isfinite(start) and math.isfinite(end) and math.isfinite(gpus)) \
                or end <= start:
            return
        while self._ends and self._ends[0][0] <= start + self._tolerance:
            self._gpus -= heapq.heappop(self._ends)[1]
        if not self._ends:
            self._gpus = 0.0  # no float residue carried from one busy stretch to the next
        heapq.heappush(self._ends, (end, gpus))
        self._gpus += gpus
        if FIRST_DAY <= day_index(start) <= LAST_DAY:
            day = day_name(day_index(start))
            self.peak[day] = max(self.peak.get(day, 0), len(self._ends))
            self.peak_gpus[day] = max(self.peak_gpus.get(day, 0.0), self._gpus)
