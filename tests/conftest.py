from __future__ import annotations

import os
import socket
import time

import httpx
import pytest

from serve_app.config import TELEMETRY_OFF_ENV

# Every test process, and every Ray/vLLM process a test starts, runs with telemetry off.
os.environ.update(TELEMETRY_OFF_ENV)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture(autouse=True)
def _no_cloud_credentials(monkeypatch):
    """No test may reach a real cloud account by accident."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "GOOGLE_APPLICATION_CREDENTIALS", "OCI_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
