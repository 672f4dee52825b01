"""`python -m serve_app` (what `make serve` runs): starts the whole stack, prints how to call
it, answers the MariTalk client, listens on nothing but its serving port (and the local license
server's, on loopback), and leaves no process behind however it is stopped."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import uuid

import httpx
import maritalk
import psutil
import pytest

from tests.conftest import free_port, wait_for
from tests.processes import (
    dialled,
    is_loopback,
    listening,
    session_processes,
    stack_processes,
    tree,
)

pytestmark = pytest.mark.e2e

STACK_ENV = "SERVE_APP_TEST_STACK"


class Cli:
    """The CLI in a process group of its own (as a shell runs a foreground job), marked so that
    everything it starts can be found, and with a Ray temp dir of its own."""

    def __init__(self, tmp_path, session, host: str = "127.0.0.1", eager: bool = True) -> None:
        self.port = free_port()
        self.license_port = free_port()
        self.marker = uuid.uuid4().hex
        self.ray_temp_dir = tempfile.mkdtemp(prefix="", dir=session.ray_temp_dir)
        self.data_dir = tmp_path
        env = {**os.environ, STACK_ENV: self.marker, "RAY_TMPDIR": self.ray_temp_dir,
               "SERVE_APP_DATA_DIR": str(tmp_path), "SERVE_APP_HOST": host,
               "SERVE_APP_LICENSE_SERVER_PORT": str(self.license_port),
               "SERVE_APP_KEY_STORE_PATH": str(tmp_path / "api_keys.db")}
        if host == "0.0.0.0":
            # MariTalk Local's own client sends no key (the test calls the app with it).
            env["SERVE_APP_ALLOW_UNAUTHENTICATED"] = "true"
        if eager:
            env["SERVE_APP_ENFORCE_EAGER"] = "true"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve_app", "--port", str(self.port), "--dev-license"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=True,
        )
        self.output: list[str] = []
        threading.Thread(target=lambda: self.output.extend(self.proc.stdout), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self, tail: int = 4000) -> str:
        return "".join(self.output)[-tail:]

    def wait_started(self) -> None:
        wait_for(lambda: any("Press Ctrl-C" in line for line in self.output)
                 or self.proc.poll() is not None,
                 timeout=600, interval=1, what="the stack to start")
        assert self.proc.poll() is None, self.text()

    def processes(self):
        return session_processes(self.marker, self.ray_temp_dir, variable=STACK_ENV)

    def named(self, prefix: str) -> list[int]:
        return [f.pid for f in self.processes() if f.cmdline.startswith(prefix)]

    def assert_all_gone(self, timeout: float = 60) -> None:
        """Every process the stack started exits (Ray's and vLLM's first among them)."""
        def gone() -> bool:
            return not self.processes()

        try:
            wait_for(gone, timeout=timeout, interval=0.5, what="the stack's processes to exit")
        except AssertionError:
            left = self.processes()
            raise AssertionError(
                "left behind:\n" + "\n".join(map(str, left)) + "\nof which Ray/vLLM:\n"
                + "\n".join(map(str, stack_processes(left))) + "\n" + self.text()) from None

    def close(self) -> None:
        """Whatever a test left running goes, by pid, marker-proven ours."""
        for found in self.processes():
            try:
                os.kill(found.pid, signal.SIGKILL)
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def cli_factory(tmp_path, session):
    started: list[Cli] = []

    def start(**kw) -> Cli:
        cli = Cli(tmp_path, session, **kw)
        started.append(cli)
        return cli

    yield start
    for cli in started:
        cli.close()


def test_serve_command_serves_only_its_port_and_stops_on_ctrl_c(cli_factory, tmp_path):
    """What `make serve` runs, with vLLM's compiled default: a local license server, a
    development license, the app. Served on every interface (SERVE_APP_HOST=0.0.0.0), so the
    test can tell the serving port's address from everything else's."""
    cli = cli_factory(host="0.0.0.0", eager=False)
    cli.wait_started()
    printed = cli.text(20000)
    assert f"http://0.0.0.0:{cli.port}" in printed
    # Told so at start (allow_unauthenticated).
    assert "WITHOUT AUTHENTICATION" in cli.text(10**9)
    assert "MariTalkLocal" in printed and "/v1/chat/completions" in printed

    answer = maritalk.MariTalkLocal(host="127.0.0.1", port=cli.port).generate(
        "What is the capital of France?", do_sample=False, max_tokens=30)
    assert "Paris" in answer["output"]

    status = subprocess.run([sys.executable, "-m", "serve_app", "status", "--url", cli.url],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert "local-development" in status.stdout
    assert re.search(r"instances_now\s+1", status.stdout), status.stdout
    assert (tmp_path / "license_server" / "licenses.db").exists()
    assert (tmp_path / "usage_ledger.db").exists()

    procs = tree(cli.proc.pid)
    names = " ".join(p.name() for p in procs)
    assert "raylet" in names and "gcs_server" in names and "VLLM::EngineCor" in names, names
    sockets = listening(procs)
    exposed = [s for s in sockets if not is_loopback(s.host)]
    assert [(s.host, s.port) for s in exposed] == [("0.0.0.0", cli.port)], "\n".join(
        map(str, exposed))
    assert any(s.port == cli.license_port for s in sockets)  # on loopback, as checked above
    remote = [s for s in dialled(procs) if not is_loopback(s.host)]
    assert not remote, "\n".join(map(str, remote))

    # Ctrl-C in a terminal: SIGINT to the whole foreground process group.
    os.killpg(cli.proc.pid, signal.SIGINT)
    assert cli.proc.wait(timeout=120) == 0, cli.text()
    cli.assert_all_gone()


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_stopping_the_main_process_leaves_nothing(cli_factory, tmp_path, stop):
    """SIGTERM (a service manager's stop) unwinds like Ctrl-C and delivers the pending usage
    first; SIGKILL leaves no chance to clean up, so Ray's processes and the license server die
    with the CLI through the kernel, Ray's workers with their raylet, and vLLM's engine with its
    replica. What a SIGKILL left undelivered goes out at the next start, under a new
    development license, with the key of the license it accrued under: nothing is refused."""
    cli = cli_factory()
    cli.wait_started()
    assert cli.named("VLLM::EngineCore")
    first = httpx.get(f"{cli.url}/license", timeout=10).json()["license_id"]
    # Usage accrues from the replica's first heartbeat after it registers: killed before it,
    # the first license has no second to bill, and nothing to carry to the next start.
    wait_for(lambda: httpx.get(f"{cli.url}/license", timeout=10).json()[
        "instance_seconds_total"] > 0, timeout=120, interval=1, what="the first usage")
    if stop == "sigterm":
        cli.proc.send_signal(signal.SIGTERM)
        assert cli.proc.wait(timeout=120) == 0, cli.text()
        assert "Usage delivered to the license server." in cli.text(), cli.text()
    else:
        cli.proc.kill()
        assert cli.proc.wait(timeout=30) == -signal.SIGKILL
    cli.assert_all_gone()
    if stop == "sigterm":
        return

    again = cli_factory()  # the same data folder: its license server, its ledger
    again.wait_started()

    def verify() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "serve_app", "usage-log", "verify",
                               "--ledger", str(tmp_path / "usage_ledger.db")],
                              capture_output=True, text=True, timeout=60)

    def delivered() -> dict | None:
        # The first license's seconds are sealed and sent by the new run's actor at its own
        # pace (a report interval): done once none is pending and its usage log bills them.
        st = httpx.get(f"{again.url}/license", timeout=10).json()
        if st["older_licenses_pending_seconds"] != 0 or first not in verify().stdout:
            return None
        return st

    st = wait_for(delivered, timeout=240, interval=2, what="the first license's last usage")
    assert st["license_id"] != first
    assert (st["quarantined_reports"], st["quarantined_seconds"]) == (0, 0), st["quarantined"]
    checked = verify()
    assert checked.returncode == 0 and "chain intact" in checked.stdout, checked.stdout
    again.proc.send_signal(signal.SIGTERM)
    assert again.proc.wait(timeout=120) == 0, again.text()
    again.assert_all_gone()


def _load(url: str, requests: int, started: threading.Event) -> None:
    def one() -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/completions", timeout=120, json={
                "model": "smollm2-135m-instruct", "prompt": "Tell me a long story.",
                "max_tokens": 400, "stream": True, "ignore_eos": True,
            }) as resp:
                for _ in resp.iter_lines():
                    started.set()
        except httpx.HTTPError:
            pass  # the stack is being stopped under it

    for _ in range(requests):
        threading.Thread(target=one, daemon=True).start()


def test_a_replaced_replica_takes_its_engine_along_and_a_loaded_stack_stops_on_group_sigterm(
        cli_factory):
    """Serve replaces a replica that died abruptly: its engine core must not stay behind.
    Then SIGTERM to the process group while requests stream, as a supervisor stops a job."""
    cli = cli_factory()
    cli.wait_started()
    (replica,) = cli.named("ray::ServeReplica")
    (engine,) = cli.named("VLLM::EngineCore")
    assert any(f"serve_app.process_guard {replica} {engine}" in f.cmdline
               for f in cli.processes())

    os.kill(replica, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(engine) or
             psutil.Process(engine).status() == psutil.STATUS_ZOMBIE,
             timeout=30, interval=0.2, what="the dead replica's engine core to die")
    wait_for(lambda: (set(cli.named("ray::ServeReplica")) - {replica})
             and httpx.get(f"{cli.url}/health", timeout=5).status_code == 200,
             timeout=300, interval=1, what="Serve's new replica to serve")
    assert len(cli.named("VLLM::EngineCore")) == 1

    started = threading.Event()
    _load(cli.url, 8, started)
    assert started.wait(timeout=120), cli.text()
    os.killpg(cli.proc.pid, signal.SIGTERM)
    cli.proc.wait(timeout=120)  # raises if the stack does not stop
    cli.assert_all_gone()


def test_keys_made_rotated_and_revoked_with_the_cli_while_the_stack_serves(cli_factory,
                                                                           tmp_path):
    """The operator's `python -m serve_app keys` and `usage` commands, as separate processes
    on the key store of a running `python -m serve_app` (loopback, real vLLM): the stack is
    open until the first key, each change reaches the replica without a restart, and usage
    per key holds the tokens vLLM counted."""
    cli = cli_factory()
    cli.wait_started()
    env = {**os.environ, "SERVE_APP_KEY_STORE_PATH": str(tmp_path / "api_keys.db")}

    def command(*argv: str) -> str:
        run = subprocess.run([sys.executable, "-m", "serve_app", *argv], env=env,
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    counted = [0, 0, 0]  # team-a's answers: requests, prompt and completion tokens

    def chat(secret: str | None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        resp = httpx.post(f"{cli.url}/v1/chat/completions", headers=headers, timeout=120, json={
            "model": "smollm2-135m-instruct", "max_tokens": 5,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        if secret and resp.status_code == 200:
            usage = resp.json()["usage"]
            for i, n in enumerate((1, usage["prompt_tokens"], usage["completion_tokens"])):
                counted[i] += n
        return resp

    assert chat(None).status_code == 200  # loopback, no key yet: a development server
    secret = command("keys", "create", "--name", "team-a", "--rpm", "100")
    wait_for(lambda: chat(None).status_code == 401 and chat(secret).status_code == 200,
             timeout=30, interval=0.5, what="the first key on the replica")
    assert httpx.get(f"{cli.url}/metrics", timeout=10).status_code == 401
    metrics = httpx.get(f"{cli.url}/metrics", headers={"Authorization": f"Bearer {secret}"},
                        timeout=10).text
    assert 'serve_app_key_requests_total{key="team-a"' in metrics and secret not in metrics

    rotated = command("keys", "rotate", "team-a", "--grace", "0")
    wait_for(lambda: chat(rotated).status_code == 200 and chat(secret).status_code == 401,
             timeout=30, interval=0.5, what="the rotation on the replica")
    answer = chat(rotated)
    assert answer.headers["x-ratelimit-limit-requests"] == "100"
    listed = command("keys", "list")
    assert "team-a" in listed and "active" in listed and rotated not in listed

    command("keys", "revoke", "team-a")
    wait_for(lambda: chat(rotated).status_code == 401, timeout=30, interval=0.5,
             what="the revocation on the replica")
    assert "revoked" in chat(rotated).json()["error"]["message"]

    # Every answer's usage, as vLLM counted it, is in the store within a round.
    wait_for(lambda: _usage_of("team-a", command("usage", "--by-key", "--format", "csv"))
             == tuple(counted), timeout=30, interval=0.5, what=f"team-a's usage {counted}")
    assert counted[0] >= 3 and counted[1] > 0 and counted[2] > 0


def _usage_of(key: str, text: str) -> tuple[int, int, int] | None:
    import csv
    import io

    rows = [r for r in csv.DictReader(io.StringIO(text)) if r["key"] == key]
    if not rows:
        return None
    return tuple(sum(int(r[f]) for r in rows)  # type: ignore[return-value]
                 for f in ("requests", "prompt_tokens", "completion_tokens"))
