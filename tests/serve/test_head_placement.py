"""The license actor runs on the head node, placed by public Ray means only (see
``ray_internals``): a resource the head declares on a multi-node cluster, node affinity to the
GCS's node on a single box started by plain ``ray.init()``."""

from __future__ import annotations

import os

import pytest
from pydantic import SecretStr

from serve_app.config import TELEMETRY_OFF_ENV
from serve_app.licensing import LicenseConfig
from serve_app.licensing.placement import HEAD_RESOURCE, head_node_options
from tests.fakes import VENDOR_KEY, issue_key

pytestmark = pytest.mark.serve


@pytest.fixture
def loopback_ray(monkeypatch):
    # Every Ray address on loopback; nothing a test starts listens elsewhere.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    for key, value in TELEMETRY_OFF_ENV.items():
        monkeypatch.setenv(key, value)


def license_config(tmp_path) -> LicenseConfig:
    vendor = VENDOR_KEY
    # A closed loopback port: the actor's check-ins fail fast and stay on this machine.
    _, key = issue_key(vendor, license_id="lic_placement", server_url="http://127.0.0.1:9")
    return LicenseConfig(key=SecretStr(key),
                         ledger_path=str(tmp_path / "ledger.db"),
                         actor_name=f"license_placement_{os.getpid()}")


def node_of(options: dict) -> str:
    import ray

    @ray.remote(num_cpus=0)
    class Probe:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    probe = Probe.options(**options).remote()
    try:
        return ray.get(probe.node.remote(), timeout=60)
    finally:
        ray.kill(probe)


def test_on_a_cluster_the_head_declares_a_resource_and_the_actor_holds_it(loopback_ray,
                                                                           tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from serve_app.licensing.placement import get_license_actor

    # The worker node has more room, so nothing but the placement keeps the actor off it.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {HEAD_RESOURCE: 1}, "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=4)
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        assert worker.node_id != cluster.head_node.node_id
        assert head_node_options() == {"resources": {HEAD_RESOURCE: 0.001}}
        assert node_of(head_node_options()) == cluster.head_node.node_id
        actor = get_license_actor(license_config(tmp_path))
        assert ray.get(actor.state.remote(), timeout=60)["allowed"] in (True, False)
        # The actor is the only holder of the head's resource: it runs there.
        assert ray.available_resources()[HEAD_RESOURCE] == pytest.approx(0.999)
        ray.kill(actor)
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_on_a_single_box_plain_ray_init_places_it_on_the_one_node(loopback_ray, tmp_path):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from serve_app.licensing.placement import get_license_actor

    ray.init(num_cpus=1, include_dashboard=False)
    try:
        options = head_node_options()
        strategy = options["scheduling_strategy"]
        assert isinstance(strategy, NodeAffinitySchedulingStrategy) and not strategy.soft
        head = ray.get_runtime_context().get_node_id()
        assert strategy.node_id == head
        actor = get_license_actor(license_config(tmp_path))
        assert "allowed" in ray.get(actor.state.remote(), timeout=60)
        assert node_of(options) == head
        ray.kill(actor)
    finally:
        ray.shutdown()
