"""The CPU image, built by deploy/docker/build-offline.sh from the Dockerfile customers build, and
a Docker daemon to run it (Debian's docker.io, without bridge network or iptables rules).

Containers run with ``--network none`` (or inside the network namespace of one such container)
and are checked through ``docker exec``: no host port is published and nothing collides with
other Ray clusters on the machine. Every container and volume a test creates is removed by id at
the end of the session, and the daemon is stopped if this session started it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "docker" / "build-offline.sh"
# Debian's client, which matches Debian's daemon (another one on PATH may be newer).
DOCKER_CLI = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"
# What the test session measured, printed at its end (pytest_terminal_summary).
REPORT: list[str] = []


def report(line: str) -> None:
    REPORT.append(line)


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 (pytest's hook)
    if REPORT:
        terminalreporter.section("CPU image")
        for line in REPORT:
            terminalreporter.write_line(line)


@dataclass
class Docker:
    """The docker CLI against one daemon; remembers what it created, to remove it by id."""

    host: str
    containers: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    projects: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host}

    def __call__(self, *args: str, timeout: float = 120, check: bool = True,
                 input: str | None = None) -> subprocess.CompletedProcess[str]:
        run = subprocess.run([DOCKER_CLI, *args], env=self.env, capture_output=True, text=True,
                             timeout=timeout, input=input)
        if check and run.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: exit {run.returncode}\n"
                                 f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        return run

    def volume(self, name: str | None = None) -> str:
        name = name or f"serve-app-test-{uuid.uuid4().hex[:8]}"
        self("volume", "create", name)
        self.volumes.append(name)
        return name

    def run(self, *args: str) -> str:
        """``docker run -d ARGS``: the container's id."""
        cid = self("run", "-d", *args).stdout.strip()
        self.containers.append(cid)
        return cid

    def inspect(self, cid: str) -> dict:
        return json.loads(self("inspect", cid).stdout)[0]

    def exec_python(self, cid: str, code: str, timeout: float = 120,
                    env: dict[str, str] | None = None) -> str:
        flags = [a for k, v in (env or {}).items() for a in ("-e", f"{k}={v}")]
        run = self("exec", *flags, cid, "python", "-c", code, timeout=timeout, check=False)
        if run.returncode != 0:
            raise AssertionError(f"python in {cid[:12]} exited {run.returncode}:\n"
                                 f"{run.stderr[-3000:]}\n--- container log ---\n"
                                 f"{self.logs(cid)[-4000:]}")
        return run.stdout

    def logs(self, cid: str) -> str:
        run = self("logs", cid, check=False)
        return run.stdout + run.stderr

    def stop(self, cid: str, *args: str) -> tuple[float, int]:
        """``docker stop`` (Docker's default timeout unless given): seconds taken, exit code."""
        start = time.monotonic()
        self("stop", *args, cid, timeout=120)
        took = time.monotonic() - start
        state = self.inspect(cid)["State"]
        assert not state["Running"] and not state["OOMKilled"], state
        return took, state["ExitCode"]

    def remove(self, cid: str) -> None:
        self("rm", "-f", cid)
        assert not self("ps", "-aq", "--no-trunc", "--filter", f"id={cid}").stdout.strip()

    def cleanup(self) -> None:
        for project in self.projects:
            label = f"label=com.docker.compose.project={project}"
            self.containers += self("ps", "-aq", "--no-trunc", "--filter", label).stdout.split()
        for cid in dict.fromkeys(self.containers):
            self("rm", "-f", "-v", cid, check=False)
        for project in self.projects:
            label = f"label=com.docker.compose.project={project}"
            self.volumes += self("volume", "ls", "-q", "--filter", label).stdout.split()
        for name in dict.fromkeys(self.volumes):
            self("volume", "rm", "-f", name, check=False)


def _script(*args: str, env: dict[str, str], timeout: float) -> str:
    run = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, f"{SCRIPT.name} {' '.join(args)}:\n{run.stdout}\n{run.stderr}"
    return run.stdout


def _fields(output: str) -> dict[str, str]:
    return dict(w.split("=", 1) for line in output.splitlines() for w in line.split() if "=" in w)


@pytest.fixture(scope="session")
def docker() -> Iterator[Docker]:
    if os.geteuid() != 0 and not os.environ.get("DOCKER_HOST") and not os.environ.get("CI"):
        pytest.skip("the image tests install and start Docker: run them as root, or set "
                    "DOCKER_HOST to a daemon")
    started = _fields(_script("daemon", env=dict(os.environ), timeout=600))
    client = Docker(started["DOCKER_HOST"])
    try:
        yield client
    finally:
        client.cleanup()
        if started["STARTED"] == "1":
            _script("stop-daemon", env=client.env, timeout=120)


@dataclass(frozen=True)
class Image:
    tag: str
    id: str
    size: int
    build_seconds: int


@pytest.fixture(scope="session")
def image(docker: Docker) -> Image:
    """serve-app:cpu, built now (Docker's layer cache and the script's caches make a rebuild of
    unchanged inputs take seconds)."""
    env = {**docker.env, "PYTHON": sys.executable}
    built = _fields(_script("cpu", env=env, timeout=2400))
    img = Image(built["IMAGE"], built["ID"], int(built["SIZE"]), int(built["BUILD_SECONDS"]))
    assert docker("image", "inspect", "--format", "{{.Id}}", img.tag).stdout.strip() == img.id
    report(f"{img.tag} {img.id} {img.size / 1e9:.2f} GB; base {built['BASE_SECONDS']} s, "
           f"wheels {built['WHEELS_SECONDS']} s, docker build {img.build_seconds} s")
    return img


@pytest.fixture(scope="session")
def project(docker: Docker) -> str:
    """A compose project name of this session's; its volumes are this session's too."""
    name = f"serve-app-test-{uuid.uuid4().hex[:8]}"
    docker.projects.append(name)
    return name


@pytest.fixture(scope="session")
def model_cache(docker: Docker, project: str) -> str:
    """The volume of converted models and vLLM's compile cache, shared by the session's runs as a
    customer's restarts share it; named as compose names the project's `model-cache`."""
    return docker.volume(f"{project}_model-cache")
