"""Property-based fuzz of every license-server route, on SQLite and PostgreSQL: whatever comes
in (non-finite and huge numbers, times from 1970 to far future, overlaps, replays, oversize and
broken bodies, bad tokens), no answer is a 5xx, none makes the server work hard (counted in
lines of its code run, not in seconds), and the server's memory stays flat. And, over a real
socket, an oversize body is refused before it is read whole."""

from __future__ import annotations

import json
import socket
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

import license_server
from license_server.app import IssueRequest, LicenseService, build_app
from license_server.db import LicenseStore
from tests.conftest import LicenseServerProcess
from tests.fakes import VENDOR_KEY
from tests.unit import test_license_server as base
from tests.work import counting_lines

T0 = base.T0 + 3600
# Per request, lines of the license server's code: every answer here takes about a thousand at
# most; a walk over days no interval covers, or pairwise checks of a report's 2,000 intervals,
# take millions.
MAX_LINES = 100_000
EXAMPLES = 150
REQUEST_BYTES = 16 << 20

ids = st.one_of(st.sampled_from(["r1", "r2", "r3"]), st.sampled_from(["r1", "inst_a", "x" * 128]),
                st.sampled_from(["x" * 129, "", "a b", "é", "a\x00b"]))
near = st.floats(T0 - 600, T0 + 6 * 3600)
numbers = st.one_of(
    near, near, st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70),
    st.sampled_from([0, -1, 1e300, -1e300, 1e15, 2.9e9, T0 - 86400 * 365 * 56, T0 + 86400]))
interval = st.fixed_dictionaries(
    {"instance_id": ids, "start": numbers, "end": numbers}, optional={"gpus": numbers})
chained = st.builds(  # plausible chains, so the overlap checks see both sides
    lambda i, s, n, d: [{"instance_id": i, "start": s + k * d, "end": s + (k + 1) * d,
                         "gpus": 1} for k in range(n)],
    st.sampled_from(["r1", "r2"]), near, st.integers(1, 50), st.sampled_from([0.5, 30, 3600]))
usage_body = st.fixed_dictionaries({
    "cluster_id": st.sampled_from(["c1", "c2", "cl_" + "a" * 20]),
    "report_id": st.one_of(st.sampled_from(["rep-00001", "rep-00002", "rep-00003"]),
                           st.uuids().map(str), st.sampled_from(["short", "r" * 65])),
    "intervals": st.one_of(st.lists(interval, max_size=4), chained, chained,
                           st.just([{"instance_id": "r9", "start": T0 - 10, "end": T0}] * 2001)),
})
usage_body = st.one_of(usage_body, usage_body, usage_body,
                       usage_body.map(lambda body: {**body, "extra": 1}))
heartbeat_body = st.fixed_dictionaries(
    {"cluster_id": st.sampled_from(["c1", "c2", "\x00"])},
    optional={"instances": st.one_of(st.integers(-5, 10), numbers),
              "gpus": st.one_of(st.floats(-1, 16), numbers), "development": st.booleans(),
              "version": st.sampled_from(["0.1.0", "", "x" * 65]), "stopping": st.booleans(),
              "quarantined_reports": st.one_of(st.integers(-1, 5), numbers),
              "quarantined_seconds": numbers})
issue_body = st.fixed_dictionaries(
    {"customer": st.text(max_size=20)},
    optional={"days": numbers, "max_instances": st.one_of(st.integers(-1, 3), numbers),
              "heartbeat_interval_s": numbers, "grace_period_s": numbers,
              "models": st.lists(st.text(max_size=5), max_size=3)})
bodies = {"/v1/usage": usage_body, "/v1/heartbeat": heartbeat_body,
          "/v1/activate": heartbeat_body, "/admin/licenses": issue_body}


@st.composite
def requests(draw, lids):
    path = draw(st.sampled_from([
        "/v1/usage", "/v1/usage", "/v1/heartbeat", "/v1/activate", "/v1/status",
        "/admin/licenses", "/admin/usage", "/admin/usage", "revoke", "/health",
        "/v1/public-key", "/nowhere"]))
    method = "GET" if path in ("/v1/status", "/admin/usage", "/health", "/v1/public-key") \
        else "POST"
    if path == "/admin/licenses" and draw(st.booleans()):
        method = "GET"
    if path == "revoke":
        path = f"/admin/licenses/{draw(st.sampled_from(lids + ['nope', '%00', 'x' * 300]))}/revoke"
    if draw(st.integers(0, 20)) == 0:
        method = "PUT" if method == "GET" else "GET"
    if path in bodies and method == "POST":
        shape = draw(st.integers(0, 9))
        if shape == 0:
            body = draw(st.binary(max_size=64))
        elif shape == 1:
            body = b" " * draw(st.sampled_from([(1 << 20) + 1, 3 << 20]))
        else:  # json.dumps writes NaN and Infinity, as Python's own json would accept them
            body = json.dumps(draw(bodies[path])).encode()
    else:
        body = b""
    params = {}
    if path == "/admin/usage":
        params = draw(st.fixed_dictionaries({}, optional={
            "license_id": st.sampled_from(lids + ["nope", "\x00"]),
            "from": st.sampled_from(["2027-01-15", "1970-01-01", "2026-02-30", "x", "9999-12-31"]),
            "to": st.sampled_from(["2027-01-16", "2027-01-14", "9999-12-31", ""]),
            "limit": st.sampled_from(["1", "3", "0", "-1", "100000", "x"]),
            "offset": st.sampled_from(["0", "2", "-1", "99999999999"]),
            "cursor": st.sampled_from(["x", f"{lids[0]}/2027-01-15", "a/b"]),
            "format": st.sampled_from(["json", "csv", "xml"])}))
    right = "admin" if path.startswith("/admin") else "key0"
    auth = draw(st.sampled_from([right] * 6 + ["key1", "key2", "none", "garbage",
                                               "wrong-admin"]))
    advance = draw(st.sampled_from([0.0, 0.0, 1.0, 30.0, 3600.0]))
    return method, path, body, params, auth, advance


def fuzz_world(url):
    clock = base.Clock(T0)
    store = LicenseStore(url, now=clock).start()
    if url.startswith("postgresql"):
        base.reset_database(store.engine)
    service = LicenseService(store, VENDOR_KEY, "http://license.test", now=clock)
    keys = [service.issue(IssueRequest(models=("*",), customer="ACME", max_instances=2, grace_period_s=86400,
                                       heartbeat_interval_s=1))[1],
            service.issue(IssueRequest(models=("*",), customer="Revoked"))[1],
            service.issue(IssueRequest(models=("*",), customer="Brief", days=0.01))[1]]
    store.revoke(service.check(keys[1])[0].license_id)
    lids = [service.check(k)[0].license_id for k in keys]
    client = TestClient(build_app(service, admin_token=base.ADMIN_TOKEN))
    headers = {"key0": keys[0], "key1": keys[1], "key2": keys[2], "admin": base.ADMIN_TOKEN,
               "garbage": "MTL1.garbage.garbage", "wrong-admin": base.ADMIN_TOKEN[:-1] + "T"}
    return clock, store, client, lids, headers


@pytest.mark.parametrize("db", base.database_urls())
def test_no_input_breaks_or_slows_the_server(db, tmp_path):
    clock, store, client, lids, headers = fuzz_world(base.database_url(db, tmp_path))
    statuses: dict[int, int] = {}
    marks: list[int] = []

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(requests(lids), min_size=1, max_size=3))
    def fuzz(batch):
        for method, path, body, params, auth, advance in batch:
            clock.t += advance
            h = {"Authorization": f"Bearer {headers[auth]}"} if auth in headers else {}
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            with counting_lines(license_server) as work:
                resp = client.request(method, path, content=body, params=params, headers=h)
            # What this one request needed beyond its own body (client and server copies).
            grew = tracemalloc.get_traced_memory()[1] - before - 4 * len(body)
            assert grew < REQUEST_BYTES, (method, path, params, body[:300], grew)
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            assert resp.status_code < 500, (method, path, params, body[:300], resp.text)
            assert work.lines < MAX_LINES, (method, path, params, body[:300], work.lines)
            assert "x-server-time" in resp.headers
            if resp.status_code >= 400:
                assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
            if resp.status_code == 429:
                assert int(resp.headers["retry-after"]) >= 1
        marks.append(tracemalloc.get_traced_memory()[0])

    tracemalloc.start()
    try:
        fuzz()
    finally:
        tracemalloc.stop()
        store.engine.dispose()
    # Flat: what the run holds at its end is what it held early on (caches warm).
    settled = marks[len(marks) // 5]
    assert marks[-1] - settled < 16 << 20, (settled, marks[-1])
    assert statuses.get(200, 0) > 20 and statuses.get(400, 0) > 20, statuses


def test_an_oversize_body_is_refused_before_it_is_read(tmp_path):
    server = LicenseServerProcess(tmp_path / "ls").start()
    try:
        _, key = server.issue()
        head = (f"POST /v1/usage HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                "Content-Type: application/json\r\n")
        # Declared 50 MB, nothing sent: the answer comes without waiting for the body.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall((head + "Content-Length: 50000000\r\n\r\n").encode())
            assert b" 413 " in s.recv(4096).split(b"\r\n")[0]
        # Streamed without a length: refused once past the limit, the body never finished.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
            chunk = b" " * 65536
            for _ in range(18):  # 1.1 MiB of an unending body
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            answer = s.recv(4096)
            assert b" 413 " in answer.split(b"\r\n")[0]
            assert b"x-server-time" in answer.lower()
    finally:
        server.stop()
