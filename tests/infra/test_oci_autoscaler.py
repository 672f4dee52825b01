"""The OCI provider driven by Ray's own autoscaler code (node launcher, StandardAutoscaler) from
the shipped cluster YAML, through the real `oci` SDK against the loopback fake."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler.tags import (
    TAG_RAY_CLUSTER_NAME,
    TAG_RAY_LAUNCH_CONFIG,
    TAG_RAY_NODE_KIND,
    TAG_RAY_USER_NODE_TYPE,
)

from infra.oci.clients import Backoff, build_clients
from infra.oci.node_provider import OCINodeProvider
from tests.conftest import wait_for
from tests.infra import oci_ray
from tests.infra.oci_fake import AD, provider_section

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "infra" / "oci" / "ray_cluster.yaml"


@pytest.fixture
def cluster(oci_key, tmp_path):
    """The shipped cluster YAML, rendered by Ray, aimed at our fake's compartment and key; the
    files it mounts are stand-ins in tmp_path."""
    with open(CLUSTER_YAML) as f:
        config = yaml.safe_load(f)
    config["provider"] = {**config["provider"], **provider_section(oci_key.write_config(tmp_path))}
    for remote in config["file_mounts"]:
        local = tmp_path / Path(remote).name
        local.write_text("stand-in")
        config["file_mounts"][remote] = str(local)
    # Ray hashes the SSH key into each node's launch-config tag.
    (tmp_path / "id_ed25519").write_text("stand-in key")
    config["auth"]["ssh_private_key"] = str(tmp_path / "id_ed25519")
    return oci_ray.render(config)


def test_ray_node_launcher_launches_the_yaml_node_type(oci_fake, cluster):
    provider = OCINodeProvider(
        cluster["provider"], cluster["cluster_name"],
        client_factory=lambda cfg: build_clients(cfg, service_endpoint=oci_fake.url))
    launch = oci_ray.Launch(provider, cluster)
    created = launch("gpu_a10_1", 2)
    assert len(created) == 2 and launch.pending.value == 0
    for node_id in created:
        inst = oci_fake.instances[node_id]
        assert inst["shape"] == "VM.GPU.A10.1"
        assert inst["availabilityDomain"] == AD
        assert inst["sourceDetails"]["imageId"] == (
            cluster["available_node_types"]["gpu_a10_1"]["node_config"]["image_id"])
        assert inst["sourceDetails"]["bootVolumeSizeInGBs"] == 300
        tags = inst["freeformTags"]
        assert tags[TAG_RAY_USER_NODE_TYPE] == "gpu_a10_1"
        assert tags[TAG_RAY_NODE_KIND] == "worker"
        assert tags[TAG_RAY_CLUSTER_NAME] == cluster["cluster_name"]
        assert tags[TAG_RAY_LAUNCH_CONFIG]
    assert sorted(provider.non_terminated_nodes({TAG_RAY_USER_NODE_TYPE: "gpu_a10_1"})) == sorted(
        created)

    # A launch OCI refuses reaches the autoscaler's availability tracker, which then holds off
    # that node type; nothing is left half-launched.
    oci_fake.fail("LaunchInstance", 500, "InternalError", "Out of host capacity.")
    assert launch("gpu_h100_8", 1) == {}
    assert "Out of host capacity" in launch.unavailable()["gpu_h100_8"]
    assert launch.pending.value == 0
    assert len(oci_fake.instances) == 2


def test_standard_autoscaler_scales_a_node_type_up_and_down(oci_fake, cluster, oci_key):
    config = copy.deepcopy(cluster)
    config["provider"].update({
        "module": "tests.infra.oci_fake.LoopbackOCINodeProvider",
        "loopback_endpoint": oci_fake.url,
        # No SSH here: the updaters that would set the nodes up are off, and so is the liveness
        # check that would terminate nodes whose raylets never report.
        "disable_node_updaters": True, "worker_liveness_check": False})
    config["available_node_types"]["gpu_a10_1"]["min_workers"] = 2
    oci_fake.boot_on_launch = True
    # `ray up` launches the head (tagged so) before any autoscaler runs.
    OCINodeProvider(
        cluster["provider"], cluster["cluster_name"],
        client_factory=lambda cfg: build_clients(cfg, service_endpoint=oci_fake.url),
    ).create_node(cluster["available_node_types"]["head"]["node_config"],
                  {TAG_RAY_NODE_KIND: "head", TAG_RAY_USER_NODE_TYPE: "head"}, 1)
    scaler = oci_ray.autoscaler(lambda: config)

    def live(node_type):
        return [i for i in oci_fake.instances.values()
                if i["freeformTags"].get(TAG_RAY_USER_NODE_TYPE) == node_type
                and i["lifecycleState"] == "RUNNING"]

    scaler.update()
    wait_for(lambda: len(live("gpu_a10_1")) == 2, timeout=30, interval=0.05,
             what="two A10 nodes launched by the autoscaler's NodeLauncher threads")
    scaler.update()                 # sees them: launches no more
    assert len(oci_fake.instances) == 3
    assert {i["shape"] for i in live("gpu_a10_1")} == {"VM.GPU.A10.1"}
    assert not scaler.provider.is_terminated(live("gpu_a10_1")[0]["id"])

    config["available_node_types"]["gpu_a10_1"].update(min_workers=0, max_workers=0)
    scaler.update()
    wait_for(lambda: not live("gpu_a10_1"), timeout=30, interval=0.05,
             what="the autoscaler terminating the node type it may no longer run")
    assert oci_fake.calls.count("TerminateInstance") == 2
    assert [i["shape"] for i in oci_fake.instances.values() if i["lifecycleState"] == "RUNNING"] == [
        "VM.Standard.E5.Flex"]          # the head stays
    assert scaler.provider.non_terminated_nodes({TAG_RAY_NODE_KIND: "worker"}) == []


def test_the_provider_reads_throttled_listings_for_the_autoscaler(oci_fake, cluster):
    provider = OCINodeProvider(
        cluster["provider"], cluster["cluster_name"],
        client_factory=lambda cfg: build_clients(cfg, service_endpoint=oci_fake.url),
        backoff=Backoff(sleep=lambda s: None))
    oci_ray.Launch(provider, cluster)("gpu_a10_2", 1)
    oci_fake.fail("ListInstances", 429, "TooManyRequests", times=2)
    assert len(provider.non_terminated_nodes({TAG_RAY_NODE_KIND: "worker"})) == 1
