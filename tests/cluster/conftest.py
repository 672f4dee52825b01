"""A real multi-node Ray cluster on this box, started the way a customer's is: `ray start --head`
with a cluster config, whose autoscaler (Ray's own, v1) adds and removes worker nodes. Ray's
``fake_multinode`` provider makes each worker node one more raylet on this machine
(``fake_cluster.yaml``). One cluster serves the whole package; it is torn down by pid, never
with `ray stop` (which kills every Ray process on the machine, other people's too).

Every process the cluster starts carries ``MARKER`` in its environment (the autoscaler's fake
nodes inherit it from `ray start`): that is how teardown finds them and how the leak check
proves none outlived the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from serve_app import ray_internals
from serve_app.config import RAY_SERVE_ENV, TELEMETRY_OFF_ENV
from serve_app.licensing.placement import HEAD_RESOURCE
from tests.conftest import LicenseServerProcess, free_port, wait_for
from tests.processes import session_processes

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
MARKER = "SERVE_APP_CLUSTER_TEST"
# The license's heartbeat interval: replicas beat, and the actor checks in, this often.
HEARTBEAT_S = 2.0

# Ray's timing switches, shortened so that nodes come and go within seconds: the autoscaler's
# loop, how long a silent node still counts as capacity, Serve's proxy drain, the GCS's health
# checks of raylets.
FAST = {
    "AUTOSCALER_UPDATE_INTERVAL_S": "1",
    "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "10",
    "RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S": "1",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def marked_processes(marker: str, temp_dir: str | None = None) -> list[psutil.Process]:
    """This machine's processes whose environment carries ``MARKER=marker`` or, with
    ``temp_dir``, that hold files under the cluster's temp dir: Ray's agents rename themselves
    (setproctitle), which can overwrite the environment they show."""
    found = []
    for hit in session_processes(marker, temp_dir, variable=MARKER):
        try:
            found.append(psutil.Process(hit.pid))
        except psutil.Error:
            continue
    return found


def stop_marked(marker: str, temp_dir: str, grace_s: float = 10.0) -> None:
    """SIGTERM every marked process, then SIGKILL what is left after ``grace_s``."""
    procs = marked_processes(marker, temp_dir)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


class FakeCluster:
    """The running cluster: its address, the driver's view of it, helpers to read and break it."""

    def __init__(self, marker: str, address: str, temp_dir: str, front_door: str,
                 server: LicenseServerProcess) -> None:
        self.marker = marker
        self.address = address
        self.temp_dir = temp_dir
        self.front_door = front_door
        self.server = server

    def nodes(self) -> list[dict]:
        import ray

        return [n for n in ray.nodes() if n["Alive"]]

    def head_id(self) -> str:
        (head,) = [n["NodeID"] for n in self.nodes() if n["Resources"].get(HEAD_RESOURCE)]
        return head

    def node_type(self, node_id: str) -> str:
        (node,) = [n for n in self.nodes() if n["NodeID"] == node_id]
        res = node["Resources"]
        if res.get(HEAD_RESOURCE):
            return "head"
        return "gpu_l4" if res.get("GPU") else "cpu"

    def nodes_of_type(self, kind: str) -> list[str]:
        return [n["NodeID"] for n in self.nodes() if self.node_type(n["NodeID"]) == kind]

    def kill_node(self, node_id: str) -> list[int]:
        """SIGKILL the node's raylet and every process it started (its workers, the replicas),
        all at once: a VM that vanished. Ray's fake nodes pass their id to the raylet, which
        passes its environment on."""
        needle = f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode()
        victims = []
        for proc in marked_processes(self.marker):
            try:
                with open(f"/proc/{proc.pid}/environ", "rb") as f:
                    env = f.read().split(b"\0")
                if needle in env or f"--node_id={node_id}" in proc.cmdline():
                    victims.append(proc)
            except (OSError, psutil.Error):
                continue
        assert any(p.name() == "raylet" for p in victims), f"no raylet of ours runs {node_id}"
        for proc in victims:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        return [p.pid for p in victims]


def reload_ray_config() -> None:
    """Make this process's Ray re-read its auth settings from the environment: the mode is read
    when Ray is imported (collection imports it before any fixture runs), the token when first
    used. Ray's own ``_enable_token_auth`` re-reads the mode the same way. Done on the way in
    (this cluster's token) and out (the later tests' local clusters use ~/.ray/auth_token)."""
    ray_internals.symbol("Config").initialize("")
    ray_internals.symbol("AuthenticationTokenLoader").instance().reset_cache()


def render_config(gcs_address: str, path: Path) -> Path:
    config = yaml.safe_load((HERE / "fake_cluster.yaml").read_text())
    config["provider"]["gcs_address"] = gcs_address
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="package")
def fake_cluster(tmp_path_factory):
    import ray

    data = tmp_path_factory.mktemp("cluster")
    marker = uuid.uuid4().hex
    # Unix socket paths under the temp dir must stay short (108 bytes).
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    port = free_port()
    address = f"127.0.0.1:{port}"
    token = uuid.uuid4().hex
    serve_port = free_port()
    env_common = {
        **TELEMETRY_OFF_ENV,
        # Every Ray address on loopback (Ray otherwise dials the interface address).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # Ray 2.60's token auth, with a token of this run's own (the real ~/.ray is not touched).
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
    }
    # HAProxy's side ports, and Serve's fallback proxy's, moved off their fixed defaults: other
    # Ray clusters on this machine may hold them. Only the cluster's processes see these (this
    # process would keep them in Serve's constants for the tests that follow).
    cluster_ports = {
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
    }
    # The front door as the clusters' start commands set it: sessions hashed over the replicas.
    env = {**os.environ, **RAY_SERVE_ENV, **ray_internals.SESSION_AFFINITY_ENV, **env_common,
           **cluster_ports, **FAST,
           "RAY_FAKE_CLUSTER": "1", MARKER: marker,
           # Replicas on every node import this checkout's code (and the tests' stand-ins).
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    config_path = render_config(address, data / "cluster.yaml")
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [ray_bin, "start", "--head", f"--port={port}", "--num-cpus=1",
           f"--resources={json.dumps({HEAD_RESOURCE: 1})}",
           "--object-store-memory=200000000", f"--temp-dir={temp_dir}",
           "--node-ip-address=127.0.0.1", f"--autoscaling-config={config_path}",
           "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}",
           f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
           "--disable-usage-stats"]
    server = LicenseServerProcess(data / "server").start()
    mp = pytest.MonkeyPatch()
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        for key, value in {**RAY_SERVE_ENV, **env_common}.items():
            mp.setenv(key, value)
        reload_ray_config()
        # Ray read RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER into a constant at import, and without it
        # turns "127.0.0.1" into this machine's interface address before dialling.
        mp.setattr(ray_internals.symbol("ray_constants"), "ENABLE_RAY_CLUSTER", False)
        ray.init(address=address, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": dict(TELEMETRY_OFF_ENV)})
        from ray import serve

        serve.start(proxy_location="HeadOnly",
                    http_options={"host": "127.0.0.1", "port": serve_port})
        yield FakeCluster(marker, address, temp_dir, f"http://127.0.0.1:{serve_port}", server)
    finally:
        try:
            ray.shutdown()
        finally:
            mp.undo()
            reload_ray_config()
            stop_marked(marker, temp_dir)
            server.stop()
            leaked = [p.pid for p in marked_processes(marker, temp_dir)]
            assert not leaked, f"cluster processes outlived the tests: {leaked}"


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
# Serve's autoscaler decides within seconds here (its defaults wait 30 s up, 600 s down).
QUICK_SCALING = {"autoscaling_config": {"upscale_delay_s": 1.0, "downscale_delay_s": 3.0,
                                        "look_back_period_s": 11.0}}
# The license's instance cap; the app may scale to one replica fewer (see test_license_cap).
CAP = 3


class LicensedApp:
    """The app deployed on the cluster: GPU-pinned stand-in replicas (``standins.NodeLLM``)
    behind the front door, the license actor on the head, a real license server."""

    def __init__(self, cluster: FakeCluster, config, license_id: str) -> None:
        self.cluster = cluster
        self.config = config
        self.license_id = license_id
        self.url = cluster.front_door

    @property
    def license(self):
        return self.config.license

    def actor(self):
        import ray

        return ray.get_actor(self.license.actor_name, namespace=self.license.namespace)

    def status(self) -> dict:
        import ray

        return ray.get(self.actor().status.remote(), timeout=30)

    def chat(self) -> dict:
        resp = httpx.post(f"{self.url}/v1/chat/completions", json=CHAT, timeout=30)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def replicas(self) -> list[dict]:
        """The LLM deployment's running replicas, with their nodes (Serve's own view)."""
        from ray import serve

        app = serve.status().applications.get("serve_app")
        if app is None:
            return []
        (deployment,) = app.deployments.values()
        return [{"state": state} for state, n in deployment.replica_states.items()
                for _ in range(n)]

    def running(self) -> int:
        return sum(1 for r in self.replicas() if r["state"] == "RUNNING")

    def settle(self) -> None:
        """Wait for the state the fixture deployed, whatever ran before: this app alone on
        Serve, one running replica on one GPU node and no CPU worker node, counted once by
        the license actor. Each test starts from here, so none depends on which ran first."""
        from ray import serve

        cluster = self.cluster
        wait_for(lambda: set(serve.status().applications) == {"serve_app"}, timeout=120,
                 interval=1, what="the other tests' applications to be gone")

        def settled() -> bool:
            return (self.replicas() == [{"state": "RUNNING"}]
                    and len(cluster.nodes_of_type("gpu_l4")) == 1
                    and not cluster.nodes_of_type("cpu")
                    and self.status()["instances_now"] == 1)

        wait_for(settled, timeout=300, interval=1,
                 what="one replica on one GPU node, counted once, and no CPU node")

    def totals(self) -> tuple[float, float]:
        """(ledger, server) instance-seconds after delivering everything now."""
        import ray

        ledger = ray.get(self.actor().flush.remote(), timeout=60)
        assert ledger["pending_seconds"] == 0
        server = self.cluster.server.service.store.total_instance_seconds(self.license_id)
        return ledger["instance_seconds"] - ledger["quarantined_seconds"], server


@pytest.fixture(scope="package")
def licensed_app(fake_cluster, tmp_path_factory):
    from ray import serve

    from serve_app.builder import build_app_from_config
    from serve_app.config import AppConfig, ModelConfig
    from tests.cluster.standins import NodeLLM

    data = tmp_path_factory.mktemp("licensed")
    server = fake_cluster.server
    lic, key = server.issue(heartbeat_interval_s=HEARTBEAT_S, grace_period_s=3600,
                            max_instances=CAP)
    license = server.license_config(key, data / "ledger.db", report_interval_s=HEARTBEAT_S,
                                    actor_name=f"license_{fake_cluster.marker[:8]}")
    model = ModelConfig(name="m", device="gpu", accelerator_type="L4", min_replicas=1,
                        max_replicas=CAP - 1, target_ongoing_requests=2,
                        max_ongoing_requests=64)
    # No replica listener: on a cluster the head's front door is the one address (http_port
    # unset, as deploy/serve_config_cluster.yaml's replica_http: false).
    config = AppConfig(models=(model,), license=license, http_port=None)
    serve.run(build_app_from_config(config, llm_cls=NodeLLM, llm_options=QUICK_SCALING),
              name="serve_app", route_prefix="/", blocking=False)
    app = LicensedApp(fake_cluster, config, lic.license_id)
    wait_for(lambda: httpx.post(f"{app.url}/v1/chat/completions", json=CHAT,
                                timeout=10).status_code == 200,
             timeout=180, what="the app through the front door")
    yield app
    serve.delete("serve_app")
