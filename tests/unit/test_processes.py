"""The test helpers that find a session's processes and judge addresses: a leak check that
cannot see a leak, or a socket check that takes every address for loopback, would pass
forever."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from tests.conftest import wait_for
from tests.processes import SESSION_ENV, is_loopback, session_processes

SLEEP = [sys.executable, "-c", "import time; time.sleep(120)"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_finds_processes_by_marker_or_by_a_file_open_under_the_temp_dir(tmp_path):
    marker = uuid.uuid4().hex
    held = tmp_path / "held.log"
    procs = {
        "marked": subprocess.Popen(SLEEP, env={**os.environ, SESSION_ENV: marker}),
        "holder": subprocess.Popen([sys.executable, "-c",
                                    f"f = open({str(held)!r}, 'w'); import time; time.sleep(120)"]),
        "other": subprocess.Popen(SLEEP, env={**os.environ, SESSION_ENV: marker + "0"}),
    }
    try:
        wanted = {procs["marked"].pid, procs["holder"].pid}
        found = wait_for(
            lambda: (pids := {f.pid for f in session_processes(marker, str(tmp_path))})
            >= wanted and pids, timeout=20, interval=0.1, what="both processes")
        assert found == wanted
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
    assert not session_processes(marker, str(tmp_path))


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("::1", True), ("::ffff:127.0.0.1", True), ("127.0.0.53", True),
    ("0.0.0.0", False), ("::", False), ("192.0.2.2", False), ("::ffff:192.0.2.2", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback
