"""`python -m serve_app` (what `make serve` runs): starts the whole stack, prints how to call
it, answers the MariTalk client, and leaves no Ray or vLLM process behind after Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import maritalk
import psutil
import pytest

from tests.conftest import free_port, wait_for

pytestmark = pytest.mark.e2e

STACK_PROCESS = ("raylet", "gcs_server", "ray::", "EngineCore", "VLLM", "serve_app",
                 "license_server")


def stack_pids() -> set[int]:
    pids = set()
    for proc in psutil.process_iter(["pid", "cmdline", "name"]):
        try:
            text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["name"] or "")
        except psutil.Error:
            continue
        if any(marker in text for marker in STACK_PROCESS) and proc.pid != os.getpid():
            pids.add(proc.pid)
    return pids


def test_serve_command_runs_and_stops_cleanly(tmp_path):
    """What `make serve` runs: a local license server, a development license, the app."""
    before = stack_pids()
    port = free_port()
    env = {**os.environ, "SERVE_APP_DATA_DIR": str(tmp_path),
           "SERVE_APP_LICENSE_SERVER_PORT": str(free_port())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve_app", "--port", str(port), "--dev-license"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("Press Ctrl-C" in line for line in output) or proc.poll() is not None,
                 timeout=600, interval=1, what="the stack to start")
        assert proc.poll() is None, "".join(output)[-3000:]
        printed = "".join(output)
        assert f"http://127.0.0.1:{port}" in printed
        assert "MariTalkLocal" in printed and "/v1/chat/completions" in printed

        answer = maritalk.MariTalkLocal(host="127.0.0.1", port=port).generate(
            "What is the capital of France?", do_sample=False, max_tokens=30)
        assert "Paris" in answer["output"]

        status = subprocess.run([sys.executable, "-m", "serve_app", "status", "--url",
                                 f"http://127.0.0.1:{port}"], capture_output=True, text=True,
                                timeout=60)
        assert status.returncode == 0, status.stderr
        assert "local-development" in status.stdout
        assert re.search(r"instances_now\s+1", status.stdout), status.stdout
        assert (tmp_path / "license_server" / "licenses.db").exists()
        assert (tmp_path / "usage_ledger.db").exists()

        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, "".join(output)[-3000:]
        assert time.monotonic() - started < 120
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_for(lambda: not (stack_pids() - before), timeout=60,
             what=f"stack processes to exit: {stack_pids() - before}")
