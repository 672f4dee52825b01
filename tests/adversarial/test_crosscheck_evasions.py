"""The customer who wants to pay less, seen from the vendor's side: each evasion of the usage
cross-check, played against the real license server (its HTTP app, a real LicenseService and
store, SQLite and PostgreSQL) over hours or days of simulated time on an injected clock. Each
test states the simulated time within which the vendor sees it, and checks the flag or alert
names the license, the cluster (None for the license as a whole), the day and the evidence.
An honest customer on the same clock and policy gets no flag at all.

The cheater here sends what a patched license actor would send: the server cannot tell a
patch from a bug, only that the numbers do not add up.
"""

from __future__ import annotations

import csv
import io
import time
import uuid

from starlette.testclient import TestClient

from license_server.app import LicenseService, build_app
from tests.fakes import BEAT, VENDOR_KEY
from tests.unit import test_license_server as base

store = base.store  # SQLite, and PostgreSQL when TEST_POSTGRES_URL is set
DAY, HOUR = base.DAY, 3600.0
START = base.T0 + HOUR  # 01:00 UTC of a day
ADMIN = base.ADMIN


def day_of(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


class Vendor:
    """The vendor's license server through its HTTP app, on the scenario's clock."""

    def __init__(self, store) -> None:
        self.clock = store.clock
        self.clock.t = base.T0
        self.service = LicenseService(store, VENDOR_KEY, "http://license.test", now=self.clock)
        self.http = TestClient(build_app(self.service, admin_token=base.ADMIN_TOKEN))

    def customer(self, **license) -> Customer:
        resp = self.http.post("/admin/licenses", json={
            "customer": "ACME", "days": 365, "models": ["*"], "heartbeat_interval_s": 30.0,
            **license}, headers=ADMIN)
        assert resp.status_code == 201, resp.text
        return Customer(self, resp.json()["key"], resp.json()["license"]["license_id"])

    def usage(self, lid: str) -> dict:
        resp = self.http.get("/admin/usage", params={"license_id": lid}, headers=ADMIN)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def flags(self, lid: str, code: str | None = None) -> list[dict]:
        """Every flag and alert of the license (once each), or those with ``code``."""
        page = self.usage(lid)
        seen, out = set(), []
        for f in [f for r in page["usage"] for f in r["flags"]] + page["alerts"]:
            key = (f["code"], f["cluster_id"], f["day"])
            if key not in seen and code in (None, f["code"]):
                seen.add(key)
                out.append(f)
        return out


class Customer:
    """A customer's cluster(s), talking to the vendor as a license actor does."""

    def __init__(self, vendor: Vendor, key: str, lid: str) -> None:
        self.vendor, self.lid = vendor, lid
        self.headers = {"Authorization": f"Bearer {key}"}

    def heartbeat(self, cluster: str, instances: int, gpus: float = 0.0, stopping: bool = False):
        return self.vendor.http.post("/v1/heartbeat", json={
            **BEAT, "cluster_id": cluster, "instances": instances, "gpus": gpus,
            "stopping": stopping}, headers=self.headers)

    def report(self, cluster: str, intervals: list[tuple[str, float, float, float]]):
        resp = self.vendor.http.post("/v1/usage", json={
            "cluster_id": cluster, "report_id": uuid.uuid4().hex,
            "intervals": [{"instance_id": i, "start": s, "end": e, "gpus": g}
                          for i, s, e, g in intervals]}, headers=self.headers)
        assert resp.status_code == 200, resp.text
        return resp

    def run(self, *, instances: int, start: float, seconds: float, every: float = 30.0,
            report_every: float = 300.0, gpus_each: float = 0.0, cluster: str = "c1",
            reported_share: float = 1.0, reported_gpus_each: float | None = None,
            clean_stop: bool = True) -> None:
        """Serve ``instances`` for ``seconds`` from ``start``: a heartbeat every ``every`` s,
        a report every ``report_every`` s of each instance's time since the last one (only
        ``reported_share`` of it, and ``reported_gpus_each`` GPUs, for a cheat), and at the end
        the last report and a heartbeat that says the cluster stops."""
        clock = self.vendor.clock
        clock.t, last_report, end = start, start, start + seconds
        reported_gpus = gpus_each if reported_gpus_each is None else reported_gpus_each

        def deliver() -> None:
            nonlocal last_report
            if clock.t > last_report:
                cut = last_report + reported_share * (clock.t - last_report)
                self.report(cluster, [(f"{cluster}-r{n}", last_report, cut, reported_gpus)
                                      for n in range(instances)])
                last_report = clock.t

        while True:
            assert self.heartbeat(cluster, instances, instances * gpus_each).status_code == 200
            if clock.t - last_report >= report_every:
                deliver()
            if clock.t >= end:
                break
            clock.t = min(clock.t + every, end)
        if clean_stop:
            deliver()
            assert self.heartbeat(cluster, 0, stopping=True).json()["lease"] is None


def named(f: dict, lid: str, cluster: str | None, day: str) -> bool:
    return (f["license_id"], f["cluster_id"], f["day"]) == (lid, cluster, day)


def test_an_honest_customer_is_never_flagged(store):
    """8 instances for 2 hours with 8 GPUs, regular heartbeats, full reports and a clean stop;
    then a second cluster for 30 days, heartbeating every 6 hours: no flag and no alert, while
    it runs, an hour after, and the day after."""
    vendor = Vendor(store)
    honest = vendor.customer(max_instances=8, max_gpus=8)
    honest.run(instances=8, gpus_each=1.0, start=START, seconds=2 * HOUR)
    for t in (START + 2 * HOUR, START + 3 * HOUR + 1, START + DAY + 2 * HOUR):
        vendor.clock.t = t
        assert vendor.flags(honest.lid) == [], t
    (row,) = vendor.usage(honest.lid)["usage"]
    assert row["instance_seconds"] == row["observed_instance_seconds"] == 8 * 2 * HOUR
    assert row["gpu_seconds"] == row["observed_gpu_seconds"] == 8 * 2 * HOUR

    monthly = vendor.customer(heartbeat_interval_s=6 * HOUR)
    start = START + 2 * DAY
    monthly.run(instances=2, start=start, seconds=30 * DAY, every=6 * HOUR,
                report_every=6 * HOUR)
    vendor.clock.t = start + 31 * DAY
    assert vendor.flags(monthly.lid) == []
    assert sum(r["instance_seconds"] for r in vendor.usage(monthly.lid)["usage"]) == 2 * 30 * DAY


def test_slow_heartbeats_with_empty_reports(store):
    """8 instances for 2 hours, heartbeats 300 s apart (the license says 30 s) and an empty
    report after each. The gaps are counted (8 x 7200 instance-seconds observed, not 0);
    heartbeats_slow shows within 5 minutes (the first slow gap), reports_missing within the
    report window and one heartbeat (65 minutes), reported_short within 3 hours (the hours
    served, judged an hour after each ended)."""
    vendor = Vendor(store)
    cheat = vendor.customer(max_instances=8)
    day = day_of(START)
    clock = vendor.clock
    clock.t = START
    while clock.t <= START + 2 * HOUR:
        assert cheat.heartbeat("c1", 8).status_code == 200
        assert cheat.report("c1", []).json()["accepted"]
        if clock.t == START + 300:
            (slow,) = vendor.flags(cheat.lid, "heartbeats_slow")
            assert named(slow, cheat.lid, "c1", day)
            assert slow["evidence"]["slow_gaps"] == 1 and slow["evidence"]["longest_gap_s"] == 300
        if clock.t == START + HOUR + 300:
            (missing,) = vendor.flags(cheat.lid, "reports_missing")
            assert named(missing, cheat.lid, "c1", day)
            assert missing["evidence"]["unreported_since"] == START
            assert missing["evidence"]["covered_until"] is None
        clock.t += 300
    clock.t = START + 3 * HOUR
    (short,) = vendor.flags(cheat.lid, "reported_short")
    assert named(short, cheat.lid, None, day)
    assert short["evidence"] == {"reported_instance_seconds": 0.0,
                                 "observed_instance_seconds": 8 * 2 * HOUR,
                                 "checked_until": START + 2 * HOUR}
    (slow,) = vendor.flags(cheat.lid, "heartbeats_slow")
    assert slow["evidence"]["slow_gaps"] == 24
    # The admin's other views say the same, in CSV and in the cluster view.
    text = vendor.http.get("/admin/usage", params={"license_id": cheat.lid, "format": "csv"},
                           headers=ADMIN).text
    (row,) = list(csv.DictReader(io.StringIO(text)))
    assert "heartbeats_slow (cluster c1; slow_gaps=24" in row["flags"]
    assert "reported_short (reported_instance_seconds=0.0" in row["flags"]
    (cluster,) = vendor.http.get(f"/admin/licenses/{cheat.lid}/clusters",
                                 headers=ADMIN).json()["clusters"]
    assert (cluster["unreported_since"], cluster["covered_until"]) == (START, None)


def test_every_heartbeat_says_the_cluster_stops(store):
    """8 instances for 2 hours, every heartbeat (30 s apart) saying the cluster stops, no
    report: such heartbeats get no lease, and they are observed all the same (a "stop"
    followed by more heartbeats within a slow gap is not a stop). reports_missing shows within
    the report window and one heartbeat (61 minutes), reported_short within 3 hours."""
    vendor = Vendor(store)
    cheat = vendor.customer(max_instances=8)
    clock = vendor.clock
    clock.t = START
    while clock.t <= START + 2 * HOUR:
        assert cheat.heartbeat("c1", 8, stopping=True).json()["lease"] is None
        if clock.t == START + HOUR + 30:
            (missing,) = vendor.flags(cheat.lid, "reports_missing")
            assert named(missing, cheat.lid, "c1", day_of(START))
        clock.t += 30
    clock.t = START + 3 * HOUR
    (short,) = vendor.flags(cheat.lid, "reported_short")
    assert named(short, cheat.lid, None, day_of(START))
    assert short["evidence"]["observed_instance_seconds"] == 8 * 2 * HOUR


def test_a_new_cluster_id_on_every_heartbeat(store):
    """A cluster that renames itself at every heartbeat (30 s) so that no two heartbeats make
    a gap to observe. The 11th new id (after 5 minutes) flags cluster_churn; the 17th is
    refused (403 too_many_clusters: 16 hold a lease) and gets no lease to serve under; an
    hour on, every refusal is in the evidence."""
    vendor = Vendor(store)
    cheat = vendor.customer(max_instances=8)
    limit = vendor.service.policy.max_new_clusters_per_day
    cap = vendor.service.policy.max_clusters
    clock = vendor.clock
    clock.t = START
    answers = []
    for n in range(120):
        answers.append(cheat.heartbeat(f"rotating-{n}", 8))
        if n == limit - 1:
            assert vendor.flags(cheat.lid, "cluster_churn") == []
        if n == limit:
            (churn,) = vendor.flags(cheat.lid, "cluster_churn")
            assert named(churn, cheat.lid, None, day_of(START))
            assert churn["evidence"]["new_clusters"] == limit + 1
        clock.t += 30
    assert [a.status_code for a in answers] == [200] * cap + [403] * (120 - cap)
    assert all(a.json()["lease"] for a in answers[:cap])
    assert {a.json()["error"]["code"] for a in answers[cap:]} == {"too_many_clusters"}
    (churn,) = vendor.flags(cheat.lid, "cluster_churn")
    assert churn["evidence"] == {"new_clusters": cap, "refused_clusters": 120 - cap,
                                 "limit": limit}


def test_heartbeats_and_reports_that_stop_after_an_hour(store):
    """An hour served by the book, then silence (no heartbeat, no report, no word of a stop) on
    a license valid for a year. cluster_silent is raised within 3 minutes of the last
    heartbeat (5 intervals of 30 s, at least 180 s), naming the cluster and when it was last
    heard."""
    vendor = Vendor(store)
    cheat = vendor.customer(max_instances=8)
    cheat.run(instances=8, start=START, seconds=HOUR, clean_stop=False)
    last = START + HOUR
    vendor.clock.t = last + 180
    assert vendor.flags(cheat.lid) == []
    vendor.clock.t = last + 181
    (silent,) = vendor.flags(cheat.lid)
    assert silent["code"] == "cluster_silent" and named(silent, cheat.lid, "c1", day_of(last))
    assert silent["evidence"] == {"last_heartbeat_at": last, "silent_s": 181.0, "limit_s": 180.0,
                                  "instances": 8, "gpus": 0.0}
    # It stays until the cluster speaks again or the license ends.
    vendor.clock.t = last + 10 * DAY
    assert [f["code"] for f in vendor.flags(cheat.lid, "cluster_silent")] == ["cluster_silent"]


def test_reporting_9_percent_less_for_30_days(store):
    """Two instances for 30 days, each report 9 % short of the time since the last (under the
    day's 10 % tolerance), heartbeats every 6 hours as its license says. No day is ever
    flagged reported_short; reported_short_window (2 % over 30 days) is flagged within 12 hours
    (the first missing stretch, 5h28m-6h, is judged an hour after it), and on every day after.
    """
    vendor = Vendor(store)
    cheat = vendor.customer(heartbeat_interval_s=6 * HOUR)
    start = base.T0 + DAY
    clock = vendor.clock
    cheat.run(instances=2, start=start, seconds=12 * HOUR, every=6 * HOUR,
              report_every=6 * HOUR, reported_share=0.91, clean_stop=False)
    (first,) = vendor.flags(cheat.lid)
    assert first["code"] == "reported_short_window" and named(first, cheat.lid, None,
                                                                day_of(start))
    ev = first["evidence"]
    assert (ev["observed_instance_seconds"], ev["checked_until"]) == (2 * 11 * HOUR,
                                                                      start + 11 * HOUR)
    assert ev["reported_instance_seconds"] == 2 * (11 * HOUR - 0.09 * 6 * HOUR)
    cheat.run(instances=2, start=start + 12 * HOUR, seconds=30 * DAY - 12 * HOUR,
              every=6 * HOUR, report_every=6 * HOUR, reported_share=0.91)
    clock.t = start + 31 * DAY
    rows = vendor.usage(cheat.lid)["usage"]
    # The 30 days served, and the day of the last heartbeat (at midnight), whose 30 days back
    # hold the same shortfall.
    assert [r["day"] for r in rows] == [day_of(start + k * DAY) for k in range(31)]
    assert all([f["code"] for f in r["flags"]] == ["reported_short_window"] for r in rows)
    month = rows[29]["flags"][0]["evidence"]
    assert (month["window_days"], month["window_from"]) == (30, day_of(start))
    assert month["observed_instance_seconds"] == 2 * 30 * DAY
    assert abs(month["reported_instance_seconds"] - 0.91 * 2 * 30 * DAY) < 1


def test_gpu_counts_that_lie(store):
    """One 8-GPU replica for 2 hours: heartbeats say 8 GPUs, reports say 0 GPU-seconds.
    gpu_reported_short is flagged within 2 hours (the first hour, judged an hour after it
    ended). Under a 4-GPU cap the same heartbeats are over_cap_gpus_heartbeat at once."""
    vendor = Vendor(store)
    cheat = vendor.customer(max_instances=1, max_gpus=8)
    cheat.run(instances=1, gpus_each=8.0, reported_gpus_each=0.0, start=START,
              seconds=HOUR + 59 * 60, clean_stop=False)
    assert vendor.flags(cheat.lid) == []
    vendor.clock.t = START + 2 * HOUR
    (lie,) = vendor.flags(cheat.lid)
    assert lie["code"] == "gpu_reported_short" and named(lie, cheat.lid, None, day_of(START))
    assert lie["evidence"] == {"reported_gpu_seconds": 0.0, "observed_gpu_seconds": 8 * HOUR,
                               "checked_until": START + HOUR}
    capped = vendor.customer(max_gpus=4)
    assert capped.heartbeat("c1", 1, gpus=8.0).status_code == 200
    (over,) = vendor.flags(capped.lid)
    assert over["code"] == "over_cap_gpus_heartbeat" and over["evidence"] == {"gpus": 8.0,
                                                                                "cap": 4.0}
