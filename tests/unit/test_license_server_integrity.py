"""The license server holds usage reports against what can be true and what it saw itself:
through TestClient with an injected clock, on SQLite and (when configured) PostgreSQL."""

from __future__ import annotations

import hmac
import json
import time
import uuid

import pytest
from starlette.testclient import TestClient

from license_server.app import LicenseService, build_app
from license_server.cli import main
from license_server.limits import ServerPolicy
from tests.fakes import BEAT, VENDOR_KEY
from tests.unit import test_license_server as base

DAY, T0, ADMIN, ADMIN_TOKEN = base.DAY, base.T0, base.ADMIN, base.ADMIN_TOKEN
store, server = base.store, base.server
as_client = base.as_client


def licensed(server, ago=3600.0, **kw):
    """A license issued ``ago`` seconds before the clock, its key's headers and its id."""
    clock = server.service.store.clock
    clock.t -= ago
    issued = base.issue(server, **kw)
    clock.t += ago
    return as_client(issued["key"]), issued["license"]["license_id"]


def report(server, headers, intervals, report_id=None, cluster="c1"):
    body = {"cluster_id": cluster, "report_id": report_id or uuid.uuid4().hex,
            "intervals": [{"instance_id": i, "start": s, "end": e, "gpus": 0}
                          for i, s, e in intervals]}
    return server.post("/v1/usage", json=body, headers=headers)


def total(server, lid):
    return server.service.store.total_instance_seconds(lid)


def test_overlap_and_replay_are_never_billed_twice(server):
    now = server.service.store.clock.t
    headers, lid = licensed(server)
    first = report(server, headers, [("r1", now - 600, now - 500)], report_id="rep-first")
    assert first.json()["duplicate"] is False
    replay = report(server, headers, [("r1", now - 600, now - 500)], report_id="rep-first")
    assert (replay.status_code, replay.json()["duplicate"]) == (200, True)
    changed = report(server, headers, [("r1", now - 600, now - 400)], report_id="rep-first")
    assert (changed.status_code, changed.json()["error"]["code"]) == (409, "report_id_conflict")
    overlap = report(server, headers, [("r1", now - 550, now - 450)])
    assert (overlap.status_code, overlap.json()["error"]["code"]) == (409, "usage_overlap")
    inside = report(server, headers, [("r2", now - 300, now - 200), ("r2", now - 250, now - 100)])
    assert inside.status_code == 409 and "another interval" in inside.json()["error"]["message"]
    chained = report(server, headers, [("r1", now - 500, now - 400), ("r2", now - 550, now - 500)])
    assert chained.status_code == 200
    assert total(server, lid) == 250


def test_a_replica_reporting_after_a_crash(server):
    """The actor died after the server stored a report: it resends it (a replay), then the
    instance's time since, from where it left off, and the gap while it was down as one
    interval; a replacement replica gets a new id."""
    clock = server.service.store.clock
    now = clock.t
    headers, lid = licensed(server, heartbeat_interval_s=10)
    before = [("r1", now - 120, now - 60)]
    assert report(server, headers, before, report_id="rep-before-crash").status_code == 200
    clock.t += 3 * 3600  # down three hours
    assert report(server, headers, before, report_id="rep-before-crash").json()["duplicate"]
    after = [("r1", now - 60, clock.t), ("r9", clock.t - 30, clock.t)]
    assert report(server, headers, after).status_code == 200
    assert total(server, lid) == 60 + 60 + 3 * 3600 + 30


def test_interval_bounds_follow_the_license_and_the_activation(server):
    clock = server.service.store.clock

    def code(headers, s, e, cluster="c1"):
        resp = report(server, headers, [(uuid.uuid4().hex[:8], s, e)], cluster=cluster)
        return resp.json()["error"]["code"] if resp.status_code != 200 else 200

    headers, _ = licensed(server, ago=3600, grace_period_s=7200)
    now = clock.t
    issued = now - 3600
    assert code(headers, issued - 301, issued) == "interval_too_early"
    assert code(headers, issued - 299, issued) == 200
    assert code(headers, now, now + 301) == "interval_in_future"
    assert code(headers, now, now + 299) == 200
    assert code(headers, now, now) == "interval_invalid"
    old, _ = licensed(server, ago=2 * DAY, grace_period_s=3 * DAY)
    assert code(old, now - 86402, now - 1) == "interval_too_long"
    assert code(old, now - 86400, now) == 200
    # A cluster may have run for up to the grace period before its first activation, and the
    # later the activation, the later that bound.
    late, _ = licensed(server, ago=DAY, grace_period_s=7200)
    assert server.post("/v1/activate", json={"cluster_id": "late"}, headers=late).json()
    activated = clock.t
    clock.t += 5 * 3600
    assert code(late, activated - 7501, activated - 7000, "late") == "interval_too_early"
    assert code(late, activated - 7499, activated - 7000, "late") == 200


def test_limits_of_the_report_format(server):
    now = server.service.store.clock.t
    headers, lid = licensed(server)
    many = [(f"i{n}", now - 100, now - 99) for n in range(2001)]
    resp = report(server, headers, many)
    assert (resp.status_code, resp.json()["error"]["code"]) == (400, "too_many_intervals")
    for raw in [b'{"cluster_id": "c", "report_id": "rep-00001", "intervals": [{"instance_id": '
                b'"a", "start": NaN, "end": 1}]}',
                b'{"cluster_id": "c", "report_id": "rep-00001", "intervals": [{"instance_id": '
                b'"a", "start": 1, "end": Infinity}]}',
                b'{"cluster_id": "c", "report_id": "rep-00001", "intervals": [{"instance_id": '
                b'"a", "start": 1, "end": 1e999}]}',
                b'{"cluster_id": "c\\u0000", "instances": 1}',
                b'{"cluster_id": "c", "instances": 1' + b"0" * 400 + b"}",
                b'{"cluster_id": "c", "instances": -1}',
                b'{"cluster_id": "c", "instances": 1, "quarantined_seconds": NaN}']:
        path = "/v1/usage" if b"report_id" in raw else "/v1/heartbeat"
        resp = server.post(path, content=raw, headers=headers)
        assert resp.status_code == 400, (raw, resp.text)
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    big = server.post("/v1/heartbeat", content=b" " * ((1 << 20) + 1), headers=headers)
    assert (big.status_code, big.json()["error"]["code"]) == (413, "request_too_large")
    for declared in ("abc", "-1", ""):
        bad = server.post("/v1/heartbeat", content=b'{"cluster_id": "c", "instances": 1}',
                          headers={**headers, "Content-Length": declared})
        assert (bad.status_code, bad.json()["error"]["code"]) == (400, "invalid_content_length")
    assert total(server, lid) == 0


def heartbeats(server, headers, start, end, instances, every=30.0, cluster="c1"):
    clock = server.service.store.clock
    clock.t = start
    while clock.t <= end:
        resp = server.post("/v1/heartbeat", json={**BEAT, "cluster_id": cluster, "instances": instances},
                           headers=headers)
        assert resp.status_code == 200, resp.text
        clock.t += every


def usage(server, lid, **params):
    resp = server.get("/admin/usage", params={"license_id": lid, **params}, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_the_heartbeat_cross_check_flags_a_report_20_percent_short(server):
    clock = server.service.store.clock
    clock.t = T0 - 7200
    headers, lid = licensed(server, heartbeat_interval_s=30)
    heartbeats(server, headers, T0, T0 + 4 * 3600, instances=2)
    # Two instances for 4 h; each reported 20 % short.
    for instance in ("r1", "r2"):
        assert report(server, headers, [(instance, T0, T0 + 0.8 * 4 * 3600)]).status_code == 200
    clock.t = T0 + DAY + 3601
    (row,) = usage(server, lid)["usage"]
    assert row["observed_instance_seconds"] == 2 * 4 * 3600
    assert row["instance_seconds"] == 0.8 * 2 * 4 * 3600
    # Short by day and over the window; the last fifth of the time is still not covered, and
    # the cluster went quiet without saying it stops.
    assert [f["code"] for f in row["flags"]] == ["reported_short", "reported_short_window",
                                                 "reports_missing", "cluster_silent"]
    short = row["flags"][0]
    assert "20.0% short" in short["reason"]
    assert (short["license_id"], short["cluster_id"], short["day"]) == (lid, None, row["day"])
    assert short["evidence"]["observed_instance_seconds"] == 2 * 4 * 3600


def test_honest_reports_raise_no_flag(server):
    clock = server.service.store.clock
    clock.t = T0 - 7200
    headers, lid = licensed(server, heartbeat_interval_s=30, max_instances=2)
    heartbeats(server, headers, T0, T0 + 3600, instances=2)
    assert report(server, headers, [("r1", T0, T0 + 3600), ("r2", T0, T0 + 3600)]).json()
    server.post("/v1/heartbeat", json={**BEAT, "cluster_id": "c1", "instances": 2,
                                       "stopping": True}, headers=headers)
    clock.t = T0 + DAY + 3601
    page = usage(server, lid)
    assert page["usage"][0]["flags"] == [] and page["alerts"] == []


def test_a_license_capped_at_n_seeing_n_plus_1_is_flagged_not_silently_billed(server):
    clock = server.service.store.clock
    clock.t = T0 - 7200
    headers, lid = licensed(server, heartbeat_interval_s=30, max_instances=2)
    heartbeats(server, headers, T0, T0 + 600, instances=3)
    three = [(f"r{n}", T0, T0 + 600) for n in range(3)]
    assert report(server, headers, three).status_code == 200  # billed: it was served
    (row,) = usage(server, lid)["usage"]
    assert (row["max_heartbeat_instances"], row["max_concurrent_reported"]) == (3, 3)
    assert {f["code"] for f in row["flags"]} == {"over_cap_heartbeat", "over_cap_reported"}
    assert row["instance_seconds"] == 1800
    # Two clusters of two each are four at once, too.
    headers2, lid2 = licensed(server, heartbeat_interval_s=30, max_instances=3)
    for cluster in ("a", "b"):
        server.post("/v1/heartbeat", json={**BEAT, "cluster_id": cluster, "instances": 2},
                    headers=headers2)
    assert usage(server, lid2)["usage"][0]["max_heartbeat_instances"] == 4


def test_heartbeats_without_reports_following_and_quarantine_are_alerts(server):
    clock = server.service.store.clock
    clock.t = T0 - 7200
    headers, lid = licensed(server, heartbeat_interval_s=30)
    heartbeats(server, headers, T0, T0 + 3700, instances=1)
    server.post("/v1/heartbeat", json={**BEAT, "cluster_id": "c1", "instances": 1,
                                       "quarantined_reports": 2, "quarantined_seconds": 90.5},
                headers=headers)
    page = usage(server, lid)
    assert [a["code"] for a in page["alerts"]] == ["reports_missing", "quarantined_reports"]
    assert "reports_missing" in [f["code"] for f in page["usage"][0]["flags"]]
    listed = server.get("/admin/licenses", headers=ADMIN).json()["licenses"]
    (cluster,) = [c for lic in listed for c in lic["clusters"]]
    assert (cluster["quarantined_reports"], cluster["quarantined_seconds"]) == (2, 90.5)
    assert report(server, headers, [("r1", T0, T0 + 3700)]).status_code == 200
    assert [a["code"] for a in usage(server, lid)["alerts"]] == ["quarantined_reports"]


def test_usage_pages_and_date_ranges(server):
    clock = server.service.store.clock
    clock.t = T0 - 7200
    keys = [licensed(server, grace_period_s=30 * DAY) for _ in range(3)]
    clock.t = T0 + 5 * DAY
    for headers, _ in keys:
        for d in range(4):
            assert report(server, headers, [("r", T0 + d * DAY, T0 + d * DAY + 60)]
                          ).status_code == 200
    everything = server.get("/admin/usage", headers=ADMIN).json()
    assert len(everything["usage"]) == 12 and everything["next_cursor"] is None
    seen, cursor = [], None
    while True:
        page = server.get("/admin/usage", params={"limit": 5, **({"cursor": cursor} if cursor
                                                                else {})}, headers=ADMIN).json()
        seen += [(r["license_id"], r["day"]) for r in page["usage"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [(r["license_id"], r["day"]) for r in everything["usage"]]
    by_offset = server.get("/admin/usage", params={"limit": 5, "offset": 10},
                           headers=ADMIN).json()["usage"]
    assert [(r["license_id"], r["day"]) for r in by_offset] == seen[10:]
    day = time.strftime("%Y-%m-%d", time.gmtime(T0 + DAY))
    ranged = server.get("/admin/usage", params={"from": day, "to": day}, headers=ADMIN).json()
    assert [r["day"] for r in ranged["usage"]] == [day] * 3
    for bad in ({"from": "2026-02-30"}, {"from": "tomorrow"}, {"from": day, "to": "1999-01-01"},
                {"limit": 0}, {"limit": "many"}, {"offset": -1}, {"cursor": "x"},
                {"format": "xml"}, {"license_id": "a\x00b"}):
        resp = server.get("/admin/usage", params=bad, headers=ADMIN)
        assert resp.status_code == 400, (bad, resp.text)


def test_a_stored_infinite_interval_bills_nothing(server):
    """Intervals the routes refuse (infinite, from 1970), put in the store directly: the usage
    query answers, and the infinite one counts for no day."""
    from license_server.db import Interval

    headers, lid = licensed(server)
    server.service.store.add_report(
        report_id="rep-unbounded", license_id=lid, cluster_id="c",
        items=[Interval("a", T0, float("inf")), Interval("b", 0.0, T0)])
    resp = server.get("/admin/usage", params={"license_id": lid, "limit": 10}, headers=ADMIN)
    assert resp.status_code == 200
    assert len(resp.json()["usage"]) == 10 and resp.json()["next_cursor"]
    # The infinite interval bills no day at all (rather than every day up to the last one the
    # server can name): nothing from its start on.
    after = {"license_id": lid, "from": time.strftime("%Y-%m-%d", time.gmtime(T0)),
             "to": time.strftime("%Y-%m-%d", time.gmtime(T0 + 400 * DAY))}
    resp = server.get("/admin/usage", params=after, headers=ADMIN)
    assert resp.status_code == 200 and resp.json()["usage"] == [], resp.text[:500]


def limited(store, **policy):
    service = LicenseService(store, VENDOR_KEY, "http://license.test", now=store.clock,
                             policy=ServerPolicy(**policy))
    client = TestClient(build_app(service, admin_token=ADMIN_TOKEN))
    client.service = service
    return client


def test_rate_limits_answer_429_with_retry_after(store):
    server = limited(store, license_rate_per_s=1, license_burst=3, address_rate_per_s=0.01,
                     address_burst=6)
    headers, _ = licensed(server)
    codes = [server.get("/v1/status", headers=headers).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    resp = server.get("/v1/status", headers=headers)
    assert resp.headers["retry-after"] == "1" and resp.json()["error"]["code"] == "rate_limited"
    store.clock.t += 1
    assert server.get("/v1/status", headers=headers).status_code == 200
    other, _ = licensed(server)  # another license, same address: its burst of 6 is spent
    assert server.get("/v1/status", headers=other).status_code == 429


def test_failed_authentication_is_counted_and_slowed_but_never_locks_out_the_valid(store):
    server = limited(store, auth_failures=3, auth_window_s=60)
    headers, _ = licensed(server)
    for _ in range(3):
        assert server.get("/v1/status", headers=as_client("garbage")).status_code == 401
    blocked = server.get("/v1/status", headers=as_client("garbage"))
    assert blocked.status_code == 429 and 1 <= int(blocked.headers["retry-after"]) <= 60
    assert server.get("/admin/licenses", headers={"Authorization": "Bearer no"}
                      ).status_code == 429
    # Whoever fails from this address, the valid key and the admin token still pass from it.
    assert server.get("/v1/status", headers=headers).status_code == 200
    assert server.get("/admin/licenses", headers=ADMIN).status_code == 200
    store.clock.t += 61
    assert server.get("/v1/status", headers=as_client("garbage")).status_code == 401
    for _ in range(2):
        assert server.get("/admin/usage", headers={"Authorization": "Bearer no"}
                          ).status_code == 401
    assert server.get("/admin/usage", headers={"Authorization": "Bearer no"}).status_code == 429
    assert server.get("/admin/usage", headers=ADMIN).status_code == 200


def test_the_admin_token_is_compared_in_constant_time(server, monkeypatch):
    calls, real = [], hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("license_server.app.hmac.compare_digest", spy)
    assert server.get("/admin/licenses", headers={"Authorization": "Bearer nope"}
                      ).status_code == 401
    assert server.get("/admin/licenses", headers=ADMIN).status_code == 200
    token = ADMIN_TOKEN.encode()
    assert calls == [(b"nope", token), (token, token)]


def test_every_response_carries_the_server_time(server):
    clock = server.service.store.clock
    headers, _ = licensed(server)
    for resp in [server.get("/health"), server.get("/v1/status", headers=headers),
                 server.get("/v1/status"), server.get("/nowhere"),
                 server.post("/v1/heartbeat", content=b"{", headers=headers)]:
        assert float(resp.headers["x-server-time"]) == pytest.approx(clock.t, abs=0.001)


def test_cli_usage_takes_a_range_and_pages(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LICENSE_SERVER_DATA_DIR", str(tmp_path / "ls"))
    main(["issue", "--customer", "ACME", "--models", "*", "--json"])
    lid = json.loads(capsys.readouterr().out)["license"]["license_id"]
    from license_server.cli import LicenseServerSettings, build_service
    from license_server.db import Interval

    service, _ = build_service(LicenseServerSettings())
    now = time.time()
    service.store.add_report(report_id="rep-cli-1", license_id=lid, cluster_id="c", items=[
        Interval("a", now - 3 * DAY, now - 3 * DAY + 10), Interval("a", now - DAY, now - DAY + 5)])
    main(["usage", "--license-id", lid, "--limit", "1"])
    page = json.loads(capsys.readouterr().out)
    assert len(page["usage"]) == 1 and page["next_cursor"]
    main(["usage", "--cursor", page["next_cursor"], "--format", "csv"])
    out = capsys.readouterr()
    assert out.out.splitlines()[0].startswith("license_id,day") and len(out.out.splitlines()) == 2
    day = time.strftime("%Y-%m-%d", time.gmtime(now - DAY))
    main(["usage", "--from", day, "--to", day])
    assert [r["day"] for r in json.loads(capsys.readouterr().out)["usage"]] == [day]
    with pytest.raises(SystemExit, match="before from"):
        main(["usage", "--from", day, "--to", "2000-01-01"])
    token = (tmp_path / "ls" / "admin_token").read_text()
    main(["rotate-admin-token"])
    new = capsys.readouterr().out.strip()
    assert new != token and (tmp_path / "ls" / "admin_token").read_text() == new


def beat(server, headers, cluster, instances=1, **kw):
    return server.post("/v1/heartbeat", json={**BEAT, "cluster_id": cluster,
                                              "instances": instances, **kw}, headers=headers)


def test_clusters_holding_a_lease_are_capped(store):
    server = limited(store, max_clusters=2)
    headers, lid = licensed(server, heartbeat_interval_s=30, grace_period_s=3600)
    assert all(beat(server, headers, c).json()["lease"] for c in ("a", "b"))
    for refused in (beat(server, headers, "c"),
                    server.post("/v1/activate", json={"cluster_id": "c"}, headers=headers)):
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "too_many_clusters"
    assert beat(server, headers, "a").status_code == 200  # the two it has go on
    # A clean stop takes no new lease; the one it holds counts until it runs out.
    stop = beat(server, headers, "b", instances=0, stopping=True)
    assert (stop.status_code, stop.json()["lease"]) == (200, None)
    assert beat(server, headers, "c").status_code == 403
    store.clock.t += 3601
    assert beat(server, headers, "a").status_code == 200
    assert beat(server, headers, "c").json()["lease"]
    # Refusals are counted beside the new clusters (cluster_churn's evidence).
    assert server.service.store.observed_days(lid, "2000-01-01", "2100-01-01")[0][
        "refused_clusters"] == 3


def test_the_admin_sees_every_cluster_of_a_license(server, tmp_path, capsys):
    from license_contract import verify_lease

    clock = server.service.store.clock
    headers, lid = licensed(server, heartbeat_interval_s=30, grace_period_s=3600)
    lease = beat(server, headers, "edge-1", instances=2, gpus=4.0, version="1.2.3").json()["lease"]
    clock.t += 10
    beat(server, headers, "edge-2", instances=1, stopping=True)
    clock.t += 600
    resp = server.get(f"/admin/licenses/{lid}/clusters", headers=ADMIN)
    assert resp.status_code == 200, resp.text
    edge1, edge2 = resp.json()["clusters"]
    granted = verify_lease(lease, signer=server.service.public_key, license_id=lid,
                           cluster_id="edge-1", now=clock.t)
    assert edge1 == {**edge1, "cluster_id": "edge-1", "instances": 2, "gpus": 4.0,
                     "version": "1.2.3", "development": False, "stopped": False,
                     "lease_id": granted.lease_id, "lease_expires_at": granted.expires_at,
                     "lease_valid": True, "silent": True, "last_heartbeat_at": clock.t - 610}
    assert (edge2["stopped"], edge2["silent"], edge2["lease_id"]) == (True, False, None)
    for bad in ("nope", "a%00b"):
        assert server.get(f"/admin/licenses/{bad}/clusters", headers=ADMIN).status_code == 404
    assert server.get(f"/admin/licenses/{lid}/clusters").status_code == 401


def test_cli_clusters_and_downloads(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LICENSE_SERVER_DATA_DIR", str(tmp_path / "ls"))
    main(["issue", "--customer", "ACME", "--models", "*", "--json"])
    lid = json.loads(capsys.readouterr().out)["license"]["license_id"]
    from license_server.cli import LicenseServerSettings, build_service

    service, _ = build_service(LicenseServerSettings())
    lic = service.stored_license(service.store.get_license(lid))
    service.heartbeat(lic, "active", __import__("license_contract").HeartbeatRequest(
        cluster_id="rack-7", instances=3, gpus=2.0, development=False, version="0.1.0"))
    service.store.record_download(lid, "rack-7", "smollm2-135m-instruct")
    main(["clusters", lid])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["cluster", "last", "heartbeat", "inst"]
    assert out[1].split()[0] == "rack-7" and " 3 " in out[1] and "running" in out[1]
    main(["clusters", lid, "--json"])
    assert json.loads(capsys.readouterr().out)["clusters"][0]["lease_valid"] is True
    main(["downloads"])
    (line,) = capsys.readouterr().out.splitlines()
    assert line.split()[-3:] == [lid, "rack-7", "smollm2-135m-instruct"]
    main(["downloads", "--license-id", lid, "--json"])
    assert json.loads(capsys.readouterr().out)["downloads"][0]["cluster_id"] == "rack-7"
    with pytest.raises(SystemExit, match="no license"):
        main(["clusters", "lic_nope"])


class FakeCatalog:
    def grant(self, name, now, signing_key):
        return {"model": name, "files": [], "granted_at": now}


def test_every_download_granted_is_recorded(store):
    service = LicenseService(store, VENDOR_KEY, "http://license.test", now=store.clock,
                             catalog=FakeCatalog())
    server = TestClient(build_app(service, admin_token=ADMIN_TOKEN))
    server.service = service
    headers, lid = licensed(server, models=["m1"])
    other, lid2 = licensed(server, models=["*"])
    assert server.post("/v1/models/m1/download", json={"cluster_id": "c1"},
                       headers=headers).status_code == 200
    store.clock.t += 5
    assert server.post("/v1/models/m1/download", headers=headers).status_code == 200  # no body
    assert server.post("/v1/models/m2/download", headers=headers).status_code == 403  # refused
    assert server.post("/v1/models/m2/download", json={"cluster_id": "x y"},
                       headers=other).status_code == 400
    assert server.post("/v1/models/m2/download", json={}, headers=other).status_code == 200
    log = server.get("/admin/downloads", headers=ADMIN).json()
    assert [(d["license_id"], d["cluster_id"], d["model"]) for d in log["downloads"]] == [
        (lid2, None, "m2"), (lid, None, "m1"), (lid, "c1", "m1")]
    assert log["downloads"][2]["granted_at"] == store.clock.t - 5
    page = server.get("/admin/downloads", params={"license_id": lid, "limit": 1},
                      headers=ADMIN).json()
    assert [d["model"] for d in page["downloads"]] == ["m1"] and page["next_before"]
    rest = server.get("/admin/downloads", params={"license_id": lid, "limit": 1,
                                                  "before": page["next_before"]},
                      headers=ADMIN).json()
    assert [d["cluster_id"] for d in rest["downloads"]] == ["c1"]
    for bad in ({"limit": 0}, {"limit": "x"}, {"before": -1}, {"license_id": "a b"}):
        assert server.get("/admin/downloads", params=bad, headers=ADMIN).status_code == 400
    assert server.get("/admin/downloads").status_code == 401
