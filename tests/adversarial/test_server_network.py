"""The stranger on the network, against the license server as `python -m license_server serve`
runs it (the same uvicorn configs, cli.uvicorn_configs) on loopback ports: clients that send
slowly, hold connections, go away mid-body, spoof X-Forwarded-For, or look for the admin API on
the customers' port. Real sockets where a TestClient cannot show it; no sleeps: each wait is on
the socket (or a condition) with a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from license_server.app import IssueRequest
from license_server.cli import LicenseServerSettings, build_service, uvicorn_configs
from license_server.limits import ServerPolicy
from license_server.listener import listeners, serve_all
from tests.conftest import free_port, wait_for

TOKEN = "admin-token-of-the-network-tests-0123456789"
BOUND_S = 15.0  # every wait below ends long before this, or the test fails


class Running:
    def __init__(self, tmp_path, **settings) -> None:
        self.settings = LicenseServerSettings(data_dir=str(tmp_path / "ls"), port=free_port(),
                                              admin_token=TOKEN, **settings)
        self.service, token = build_service(self.settings)
        self.servers = listeners(uvicorn_configs(self.settings, self.service, token))
        self.thread = threading.Thread(target=asyncio.run, args=(serve_all(self.servers),),
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.settings.admin_host}:{self.settings.admin_port}"

    def key(self) -> str:
        return self.service.issue(IssueRequest(customer="ACME", models=("*",)))[1]


@contextlib.contextmanager
def running(tmp_path, **settings) -> Iterator[Running]:
    server = Running(tmp_path, **settings)
    server.thread.start()
    try:
        for url in {server.url} | ({server.admin_url} if server.settings.admin_port else set()):
            wait_for(lambda url=url: httpx.get(f"{url}/health", timeout=2).status_code == 200,
                     timeout=BOUND_S, interval=0.05, what=f"{url}")
        yield server
    finally:
        for s in server.servers:
            s.should_exit = True
        server.thread.join(timeout=BOUND_S)


def connect(server: Running) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.settings.port), timeout=BOUND_S)
    return s


def until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a timeout fails the test)."""
    got = b""
    while chunk := s.recv(65536):
        got += chunk
    return got


def one_response(s: socket.socket) -> bytes:
    """One whole response (head and its Content-Length of body) off a kept-alive connection."""
    got = b""
    while b"\r\n\r\n" not in got:
        got += s.recv(65536)
    head, _, body = got.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body


def test_a_request_head_not_whole_in_time_is_closed(tmp_path):
    with running(tmp_path, header_timeout_s=0.5, keep_alive_s=60) as server:
        # Half a head, then nothing (slowloris).
        with connect(server) as half:
            half.sendall(b"POST /v1/usage HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
            started = time.monotonic()
            assert until_closed(half) == b""
            assert time.monotonic() - started < BOUND_S
        # A connection that sends nothing at all.
        with connect(server) as mute:
            assert until_closed(mute) == b""
        # Dribbling the head byte by byte does not restart the clock.
        with connect(server) as drip:
            drip.settimeout(0.1)
            sent = 0
            head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 10_000
            closed = False
            deadline = time.monotonic() + BOUND_S
            while not closed and time.monotonic() < deadline:
                try:
                    drip.sendall(head[sent:sent + 1])
                    sent += 1
                    closed = drip.recv(1) == b""
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
            assert closed and sent < len(head)
        # On a kept-alive connection, the next head has its own deadline.
        with connect(server) as kept:
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert one_response(kept).endswith(b'{"status":"ok"}')
            kept.sendall(b"GET /health HTTP/1.1\r\nHo")
            assert until_closed(kept) == b""
        # Whole requests are answered as ever.
        assert httpx.get(f"{server.url}/health", timeout=BOUND_S).status_code == 200


def test_a_body_not_whole_in_time_is_refused_or_closed(tmp_path):
    policy = ServerPolicy(body_timeout_s=0.5)
    with running(tmp_path, header_timeout_s=1.0, keep_alive_s=60, policy=policy) as server:
        key = server.key()
        head = (f"POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n").encode()
        # Read too slowly by a route: 408 in the error shape, then the connection ends.
        with connect(server) as slow:
            slow.sendall(head + b'{"cluster_id": "c1", ')
            answer = until_closed(slow)
            assert answer.split(b"\r\n")[0] == b"HTTP/1.1 408 Request Timeout"
            assert b'"code":"body_timeout"' in answer
        # Never read (the key is wrong: 401 before the body), then dribbled: closed.
        with connect(server) as unread:
            unread.sendall(head.replace(key.encode(), b"nope") + b"{")
            first = unread.recv(65536)
            assert first.split(b"\r\n")[0] == b"HTTP/1.1 401 Unauthorized"
            unread.settimeout(0.1)
            closed, deadline = False, time.monotonic() + BOUND_S
            while not closed and time.monotonic() < deadline:
                try:
                    unread.sendall(b" ")
                    closed = unread.recv(1) == b""
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
            assert closed


def test_past_the_concurrency_limit_the_answer_is_503(tmp_path):
    with running(tmp_path, limit_concurrency=3, header_timeout_s=60, keep_alive_s=60) as server:
        held = [connect(server) for _ in range(2)]
        with connect(server) as third:
            third.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert until_closed(third).split(b"\r\n")[0] == b"HTTP/1.1 503 Service Unavailable"
        for s in held:
            s.close()
        wait_for(lambda: httpx.get(f"{server.url}/health", timeout=2).status_code == 200,
                 timeout=BOUND_S, interval=0.05, what="a free place")


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_client_gone_mid_body_is_one_line_without_a_traceback(tmp_path):
    records = Records()
    loggers = [logging.getLogger(n) for n in ("license_server", "uvicorn.error", "uvicorn")]
    with running(tmp_path) as server:
        levels = [lg.level for lg in loggers]
        for lg in loggers:  # attached after uvicorn configured its logging
            lg.addHandler(records)
            lg.setLevel(logging.INFO)
        try:
            key = server.key()
            with connect(server) as gone:
                gone.sendall((f"POST /v1/usage HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                              f"{key}\r\nContent-Length: 5000\r\n\r\n").encode() + b'{"a":')
            wait_for(lambda: any("went away" in r.getMessage() or r.levelno >= logging.ERROR
                                 for r in records.records),
                     timeout=BOUND_S, interval=0.05, what="the server to see the client go")
            assert httpx.get(f"{server.url}/health", timeout=BOUND_S).status_code == 200
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.removeHandler(records)
                lg.setLevel(level)
    assert not [r.getMessage() for r in records.records
                if r.exc_info or r.levelno >= logging.ERROR]
    (line,) = [r for r in records.records if "went away" in r.getMessage()]
    assert line.levelno == logging.INFO and "127.0.0.1" in line.getMessage()


def failed_logins(server: Running, forwarded_for: list[str]) -> list[int]:
    return [httpx.get(f"{server.url}/v1/status", timeout=BOUND_S, headers={
        "Authorization": "Bearer nope", "X-Forwarded-For": ip}).status_code
        for ip in forwarded_for]


@pytest.mark.parametrize("trusted", [False, True])
def test_x_forwarded_for_is_believed_only_from_a_configured_proxy(tmp_path, trusted):
    policy = ServerPolicy(auth_failures=2)
    settings = {"forwarded_allow_ips": "127.0.0.1"} if trusted else {}
    with running(tmp_path, policy=policy, **settings) as server:
        spoofed = failed_logins(server, ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"])
        if trusted:  # each client its own count: the proxy says who it is
            assert spoofed == [401, 401, 401, 401]
            assert failed_logins(server, ["10.0.0.1"] * 2) == [401, 429]
        else:  # by default no one is a proxy: all of it is 127.0.0.1's
            assert spoofed == [401, 401, 429, 429]


def test_the_admin_api_can_listen_on_its_own_address(tmp_path):
    with running(tmp_path, admin_port=free_port()) as server:
        admin = {"Authorization": f"Bearer {TOKEN}"}
        key = server.key()
        client_side = httpx.Client(base_url=server.url, timeout=BOUND_S)
        admin_side = httpx.Client(base_url=server.admin_url, timeout=BOUND_S)
        with client_side, admin_side:
            assert client_side.get("/admin/licenses", headers=admin).status_code == 404
            assert client_side.get("/admin/usage", headers=admin).status_code == 404
            assert client_side.get("/v1/status", headers={
                "Authorization": f"Bearer {key}"}).json()["status"] == "active"
            assert admin_side.get("/admin/licenses", headers=admin).status_code == 200
            assert admin_side.get("/v1/status", headers={
                "Authorization": f"Bearer {key}"}).status_code == 404
            assert admin_side.get("/health").status_code == 200
