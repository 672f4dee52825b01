"""The CPU image as customers run it: compose's license server and the app licensed by it, then a
second `docker run` of the image on the same volumes under the same license. Real vLLM on CPU
with SmolLM2, real clients (openai, maritalk) inside the containers.

One scenario with two starts of the app: the first, under compose, converts the model and
compiles vLLM's graph (what needs the image's g++), minutes on 2 cores; the second checks what a
restart keeps, the compiled graph among it. Then the Dockerfile's own `docker run`, without a
key.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import maritalk
import pytest
import yaml

from tests.deploy.dockerfiles import COMPOSE, ROOT, env
from tests.image.conftest import Docker, Image, report

pytestmark = pytest.mark.timeout(3600)

IMAGE_ENV = env(ROOT / "deploy" / "docker" / "Dockerfile.cpu")
PORT = int(IMAGE_ENV["SERVE_APP_PORT"])
UID = 10001
MODEL = "smollm2-135m-instruct"
CONVERTED = f"/home/app/.cache/serve_app/models/{MODEL}"
# What the app needs beyond the image's defaults to run in a container: Ray's object store in
# /dev/shm (as compose.yaml's shm_size), and an init (compose's `init: true`).
RUN_FLAGS = ["--init", "--shm-size", "2g"]
# vLLM's log lines for a compiled graph loaded from its cache, and for one compiled again.
AOT_LOADED = "Directly load AOT compilation"
AOT_RECOMPILED = "Compiling model again"
# A first start converts the model and compiles vLLM's graph: minutes on 2 cores.
START_TIMEOUT_S = 900

WAIT_HEALTHY = f"""
import time, urllib.request
deadline = time.monotonic() + {START_TIMEOUT_S}
while True:
    try:
        with urllib.request.urlopen("http://127.0.0.1:{PORT}/health", timeout=5) as r:
            if r.status == 200:
                break
    except OSError:
        pass
    if time.monotonic() > deadline:
        raise SystemExit("not healthy")
    time.sleep(0.5)
"""

OPENAI_CHAT = f"""
import openai
client = openai.OpenAI(base_url="http://127.0.0.1:{PORT}/v1", api_key="unused")
reply = client.chat.completions.create(
    model="{MODEL}", temperature=0, max_tokens=20,
    messages=[{{"role": "user", "content": "What is the capital of France?"}}])
print(reply.choices[0].message.content)
"""

MARITALK_GENERATE = f"""
import json, maritalk
model = maritalk.MariTalkLocal(host="127.0.0.1", port={PORT})
print(json.dumps(model.generate("What is the capital of France?", max_tokens=20)))
"""

LICENSE_STATUS = f"""
import urllib.request
print(urllib.request.urlopen("http://127.0.0.1:{PORT}/license", timeout=10).read().decode())
"""

# Streams that are generating when the stop begins; each prints how it ended.
STREAMS_UNDER_STOP = f"""
import threading, openai
client = openai.OpenAI(base_url="http://127.0.0.1:{PORT}/v1", api_key="unused", max_retries=0)
started = threading.Semaphore(0)
def stream(i):
    chunks = client.chat.completions.create(
        model="{MODEL}", stream=True, max_tokens=48, temperature=0,
        messages=[{{"role": "user", "content": f"Count to one hundred, {{i}}."}}])
    finish, first = None, True
    try:
        for chunk in chunks:
            if first:
                started.release()
                first = False
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
    except Exception as exc:
        finish = type(exc).__name__
    print("finished", i, finish, flush=True)
threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
for t in threads:
    t.start()
for _ in threads:
    started.acquire()
print("generating", flush=True)
for t in threads:
    t.join()
"""


def wait_healthy(docker: Docker, cid: str) -> None:
    docker.exec_python(cid, WAIT_HEALTHY, timeout=START_TIMEOUT_S + 60)


def wait_for(predicate, timeout: float, what: str, interval: float = 2.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def ask_for_paris(docker: Docker, cid: str) -> str:
    answer = docker.exec_python(cid, OPENAI_CHAT)
    assert "Paris" in answer, answer
    return answer


def maritalk_generates(docker: Docker, cid: str) -> dict:
    """MariTalk's own client (from this test's environment: the image does not ship it)."""
    package = Path(maritalk.__file__).parent
    docker("exec", cid, "mkdir", "-p", "/tmp/clients")
    docker("cp", str(package), f"{cid}:/tmp/clients/")
    out = json.loads(docker.exec_python(cid, MARITALK_GENERATE, env={"PYTHONPATH": "/tmp/clients"}))
    assert out["output"].strip() and out["completion_tokens"] > 0, out
    return out


def license_status(docker: Docker, cid: str) -> dict:
    return json.loads(docker.exec_python(cid, LICENSE_STATUS))


def listeners(docker: Docker, cid: str) -> list[tuple[str, set[int]]]:
    """(local address, pids of the processes holding it) of every listening socket in the
    container's network namespace, by ss run in that namespace (pids as the host sees them)."""
    pid = str(docker.inspect(cid)["State"]["Pid"])
    out = subprocess.run(["nsenter", "-t", pid, "-n", "ss", "-Hltunp"], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return [(line.split()[4], {int(p) for p in re.findall(r"pid=(\d+)", line)})
            for line in out.splitlines() if line.strip()]


def pids(docker: Docker, cid: str) -> set[int]:
    return {int(line.split()[0])
            for line in docker("top", cid, "-eo", "pid").stdout.splitlines()[1:]}


def assert_listens_only_on_its_port(docker: Docker, cid: str) -> None:
    """Nothing of the container's listens beyond loopback but its port. The namespace may be
    shared (the app joins the license server's): a socket counts for the container whose
    processes hold it."""
    own = pids(docker, cid)
    found = listeners(docker, cid)
    public = {addr.rsplit(":", 1)[1] for addr, held_by in found
              if held_by & own and not is_loopback(addr)}
    assert public == {str(PORT)}, found


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]").split("%")[0]
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1")


def assert_runs_as_its_user(docker: Docker, cid: str) -> None:
    assert docker("exec", cid, "id", "-u").stdout.strip() == str(UID)
    # Every process, docker-init and the ones Ray and vLLM started included.
    uids = docker("top", cid, "-eo", "uid,pid,comm").stdout.splitlines()[1:]
    assert uids and all(line.split()[0] == str(UID) for line in uids), uids


def assert_gone(docker: Docker, cid: str, pid: int) -> None:
    """After `docker stop`: the container's processes are gone; removing it leaves nothing."""
    assert not Path(f"/proc/{pid}").exists()
    docker.remove(cid)


def stop_idle(docker: Docker, cid: str) -> tuple[float, int]:
    """Idle, `docker stop` with Docker's default timeout ends it cleanly (exit 0, not the kill's
    137), and nothing is left: the seconds it took, and the exit code."""
    pid = docker.inspect(cid)["State"]["Pid"]
    took, code = docker.stop(cid)
    assert code == 0, docker.logs(cid)[-3000:]
    assert_gone(docker, cid, pid)
    return took, code


def compose_file(tmp: Path, report_interval_s: int) -> Path:
    """compose.yaml as it is, but for what Debian's docker-compose (v1) and a daemon without a
    bridge network need: no top-level `name` (v1 predates it; the project is named with -p), no
    published ports, and one network namespace with loopback only, the license server's, which
    the app joins (its /etc/hosts, shared, names the license server as the keys do)."""
    spec = yaml.safe_load(COMPOSE.read_text())
    spec.pop("name")
    services = spec["services"]
    for service in services.values():
        service.pop("ports", None)
        service.pop("build", None)
    services["license-server"].update(network_mode="none",
                                      extra_hosts=["license-server:127.0.0.1"])
    services["app"]["network_mode"] = "service:license-server"
    # Usage is reported every minute by default; the test waits for it.
    services["app"]["environment"]["SERVE_APP_REPORT_INTERVAL_S"] = str(report_interval_s)
    services.pop("app-gpu")
    path = tmp / "compose.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


class Compose:
    def __init__(self, docker: Docker, project: str, file: Path, env: dict[str, str]) -> None:
        self.docker, self.project, self.file, self.env = docker, project, file, env

    def __call__(self, *args: str, timeout: float = 300) -> str:
        run = subprocess.run(["docker-compose", "-p", self.project, "-f", str(self.file),
                              "--project-directory", str(ROOT), *args],
                             env={**self.docker.env, **self.env}, capture_output=True,
                             text=True, timeout=timeout)
        assert run.returncode == 0, f"docker-compose {' '.join(args)}:\n{run.stdout}\n{run.stderr}"
        return run.stdout

    def container(self, service: str) -> str:
        (cid,) = self("ps", "-q", service).split()
        return self.docker.inspect(cid)["Id"]

    def health(self, service: str) -> str:
        return self.docker.inspect(self.container(service))["State"]["Health"]["Status"]


def server_seconds(docker: Docker, server: str, license_id: str) -> tuple[float, list]:
    """What the vendor sees: the license's billed instance seconds and its alerts."""
    out = docker("exec", server, "python", "-m", "license_server", "usage", "--license-id",
                 license_id).stdout
    page = json.loads(out)
    return sum(row["instance_seconds"] for row in page["usage"]), page["alerts"]


def delivered(docker: Docker, app: str, server: str, license_id: str):
    """(ledger status, server total) once everything accrued is delivered and both agree."""
    st = license_status(docker, app)
    billed, alerts = server_seconds(docker, server, license_id)
    ledger = st["instance_seconds_total"] - st["quarantined_seconds"]
    if st["seconds_pending_delivery"] == 0 and billed > 0 and abs(billed - ledger) < 0.01:
        return st, billed, alerts
    return None


def test_compose_app_serves_then_a_second_docker_run_keeps_ledger_model_and_license(
        docker: Docker, image: Image, project: str, model_cache: str, tmp_path: Path):
    interval = 5
    compose = Compose(docker, project, compose_file(tmp_path, interval), {})
    docker("tag", image.id, "serve-app:cpu")  # the name compose.yaml gives the image
    compose("up", "-d", "license-server")
    wait_for(lambda: compose.health("license-server") == "healthy", 120, "the license server",
             interval=1)
    server = compose.container("license-server")
    issued = json.loads(docker("exec", server, "python", "-m", "license_server", "issue",
                               "--customer", "image-test", "--days", "2",
                               "--models", "*", "--heartbeat-interval", str(interval),
                               "--json").stdout)
    license_id = issued["license"]["license_id"]
    compose.env = {"SERVE_APP_LICENSE_KEY": issued["key"]}

    # The app under compose, licensed by the license server: its first start converts the
    # model and compiles vLLM's graph (with the image's g++).
    started = time.monotonic()
    compose("--profile", "cpu", "up", "-d")
    app = compose.container("app")
    wait_healthy(docker, app)
    serving_since = time.monotonic()
    ask_for_paris(docker, app)
    first_answer_s = time.monotonic() - started
    maritalk_generates(docker, app)
    assert_runs_as_its_user(docker, app)
    assert_listens_only_on_its_port(docker, app)
    # Compose's own health check, as `docker compose ps` shows it.
    wait_for(lambda: compose.health("app") == "healthy", 120, "compose's health check")
    st = license_status(docker, app)
    # The image pins the vendor's key, not this server's: its licenses are development ones.
    assert (st["license_id"], st["customer"], st["state"], st["development"]) \
        == (license_id, "image-test", "ok", True)
    first, billed, alerts = wait_for(lambda: delivered(docker, app, server, license_id), 120,
                                     "usage at the license server")
    assert alerts == [] and first["quarantined_reports"] == 0
    model_mtime = docker("exec", app, "stat", "-c", "%Y", f"{CONVERTED}/config.json").stdout

    # Stop under load: the responses in flight finish, within compose's stop_grace_period.
    load = subprocess.Popen([*docker_exec(docker, app), "python", "-c", STREAMS_UNDER_STOP],
                            env=docker.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert load.stdout is not None
    assert load.stdout.readline().strip() == "generating", load.stderr.read() if load.stderr else ""
    before_stop = license_status(docker, app)
    stop_started = time.monotonic()
    pid = docker.inspect(app)["State"]["Pid"]
    compose("stop", "app", timeout=120)
    loaded_stop_s = time.monotonic() - stop_started
    ran_first = time.monotonic() - started
    out, _ = load.communicate(timeout=60)
    assert len(re.findall(r"finished \d (length|stop)$", out, re.M)) == 4, out
    state = docker.inspect(app)["State"]
    assert state["ExitCode"] == 0 and not state["OOMKilled"], docker.logs(app)[-3000:]
    assert not Path(f"/proc/{pid}").exists()

    # A second `docker run` of the image, with its own command, on the same volumes and under
    # the same license (in the license server's network namespace, which the keys' URL names).
    restarted = time.monotonic()
    second = docker.run(*RUN_FLAGS, "--network", f"container:{server}",
                        "-v", f"{project}_app-data:/data",
                        "-v", f"{model_cache}:/home/app/.cache",
                        "-e", f"SERVE_APP_LICENSE_KEY={issued['key']}",
                        "-e", f"SERVE_APP_REPORT_INTERVAL_S={interval}", image.id)
    wait_healthy(docker, second)
    second_healthy_s = time.monotonic() - restarted
    ask_for_paris(docker, second)
    second_answer_s = time.monotonic() - restarted
    assert_runs_as_its_user(docker, second)
    assert_listens_only_on_its_port(docker, second)
    logs = docker.logs(second)
    assert "Converting" not in logs, logs[-3000:]
    # vLLM's compiled graph comes from the cache volume, not from minutes of compiling.
    assert AOT_LOADED in logs and AOT_RECOMPILED not in logs, logs[-3000:]
    assert docker("exec", second, "stat", "-c", "%Y", f"{CONVERTED}/config.json").stdout \
        == model_mtime
    st = license_status(docker, second)
    assert st["license_id"] == license_id and st["state"] == "ok"
    # The ledger kept the first run's usage; whatever it had not delivered is delivered now.
    assert st["instance_seconds_total"] >= before_stop["instance_seconds_total"]
    final, billed, alerts = wait_for(
        lambda: (d := delivered(docker, second, server, license_id))
        and d[0]["instance_seconds_total"] > before_stop["instance_seconds_total"] and d,
        120, "the second run's usage at the license server")
    assert alerts == [] and final["quarantined_reports"] == 0
    assert final["quarantined_seconds"] == 0
    # Not a second lost, none counted twice: the billed time covers both runs' serving time
    # (replicas count from their start, before they serve), within the heartbeats that bound
    # each run, and no more than the containers' lifetimes.
    served = (stop_started - serving_since) + (time.monotonic() - restarted - second_healthy_s)
    lived = ran_first + (time.monotonic() - restarted)
    assert served - 3 * interval <= billed <= lived + interval, (served, billed, lived)

    took, code = stop_idle(docker, second)
    report(f"compose up -> first answer {first_answer_s:.0f} s (first start: conversion and "
           f"compilation); stop under load (4 streams) {loaded_stop_s:.1f} s, exit 0")
    report(f"second docker run (compiled graph from the cache) -> healthy "
           f"{second_healthy_s:.0f} s, first answer "
           f"{second_answer_s:.0f} s; idle docker stop {took:.1f} s, exit {code}; billed "
           f"{billed:.0f} s, the two app containers lived {lived:.0f} s")


def test_docker_run_without_a_key_serves_under_a_development_license(
        docker: Docker, image: Image, model_cache: str):
    """The Dockerfile's own `docker run`: no key, no setting, the image's command; its first
    start on a data volume of its own (the model cache shared, as on a customer's machine)."""
    started = time.monotonic()
    cid = docker.run(*RUN_FLAGS, "--network", "none", "-v", f"{docker.volume()}:/data",
                     "-v", f"{model_cache}:/home/app/.cache", image.id)
    wait_healthy(docker, cid)
    ask_for_paris(docker, cid)
    answer_s = time.monotonic() - started
    maritalk_generates(docker, cid)
    st = license_status(docker, cid)
    assert (st["customer"], st["state"], st["development"]) == ("local-development", "ok", True)
    assert_runs_as_its_user(docker, cid)
    assert_listens_only_on_its_port(docker, cid)
    took, code = stop_idle(docker, cid)
    report(f"docker run without a key -> first answer {answer_s:.0f} s; idle docker stop "
           f"{took:.1f} s, exit {code}")


def docker_exec(docker: Docker, cid: str) -> list[str]:
    from tests.image.conftest import DOCKER_CLI

    return [DOCKER_CLI, "exec", cid]
