"""The CLI's Ray start: Ray's node start timeout is retried once, after ending what the
failed attempt started; any other failure is raised as it is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from serve_app.cli import start_ray
from serve_app.ray_internals import NODE_START_TIMEOUT

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


class FakeRay:
    """``ray.init`` whose first attempts start a process (its raylet) and then fail."""

    def __init__(self, failure: Exception, failures: int = 1) -> None:
        self.failure, self.failures = failure, failures
        self.inits: list[dict] = []
        self.shutdowns = 0
        self.started: list[subprocess.Popen[bytes]] = []

    def init(self, **kwargs: object) -> None:
        self.inits.append(kwargs)
        if len(self.inits) <= self.failures:
            self.started.append(subprocess.Popen(SLEEPER))
            raise self.failure

    def shutdown(self) -> None:
        self.shutdowns += 1


@pytest.fixture
def earlier_child():
    """A process the CLI started before Ray (the local license server)."""
    proc = subprocess.Popen(SLEEPER)
    yield proc
    proc.kill()
    proc.wait()


def test_a_node_start_timeout_is_retried_once_after_killing_what_the_attempt_started(
        earlier_child):
    ray = FakeRay(Exception(f"{NODE_START_TIMEOUT}. This could happen because ..."))
    start_ray(ray, include_dashboard=False)

    assert ray.inits == [{"include_dashboard": False}] * 2
    assert ray.shutdowns == 1
    failed_attempt = ray.started[0]
    assert not Path(f"/proc/{failed_attempt.pid}").exists()  # killed and reaped
    assert earlier_child.poll() is None


def test_a_second_timeout_is_raised():
    ray = FakeRay(Exception(NODE_START_TIMEOUT), failures=2)
    with pytest.raises(Exception, match=NODE_START_TIMEOUT):
        start_ray(ray)
    assert len(ray.inits) == 2
    for proc in ray.started:
        proc.kill()
        proc.wait()


def test_any_other_failure_is_raised_without_a_retry(earlier_child):
    ray = FakeRay(RuntimeError("Maybe you called ray.init twice by accident?"))
    with pytest.raises(RuntimeError, match="twice"):
        start_ray(ray)
    assert len(ray.inits) == 1 and ray.shutdowns == 0
    assert ray.started[0].poll() is None  # not ours to kill: nothing was retried
    ray.started[0].kill()
    ray.started[0].wait()
    assert earlier_child.poll() is None
