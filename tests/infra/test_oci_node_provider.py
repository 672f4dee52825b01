"""The OCI node provider through the real `oci` SDK (requests signed with a throwaway key)
against the loopback fake in `oci_fake.py`."""
from __future__ import annotations

import socket
import threading

import oci
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from ray.autoscaler.node_launch_exception import NodeLaunchException
from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME, TAG_RAY_NODE_KIND, TAG_RAY_NODE_STATUS

from infra.oci.clients import Backoff, OCIProviderConfig, build_clients
from infra.oci.node_provider import LISTING_LAG_S, OCINodeProvider
from tests.infra.oci_fake import AD, COMPARTMENT, ApiKey, provider_section


@pytest.fixture
def oci_config_file(oci_key, tmp_path):
    return oci_key.write_config(tmp_path)


WORKER = {TAG_RAY_NODE_KIND: "worker", TAG_RAY_NODE_STATUS: "uninitialized"}
A10 = {"shape": "VM.GPU.A10.1"}


class Sleeps:
    def __init__(self) -> None:
        self.slept: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)


def make_provider(fake, config_file, cluster="gpu", *, backoff=None, clock=None, **extra):
    kw = {"clock": clock} if clock else {}
    return OCINodeProvider(
        provider_section(config_file, **extra), cluster,
        client_factory=lambda cfg: build_clients(cfg, service_endpoint=fake.url),
        backoff=backoff or Backoff(sleep=Sleeps(), jitter=lambda lo, hi: hi), **kw)


def test_launch_list_tag_ips_terminate(oci_fake, oci_config_file):
    provider = make_provider(oci_fake, oci_config_file)
    other = make_provider(oci_fake, oci_config_file, cluster="someone-else")
    other.create_node(A10, WORKER, 1)

    head = provider.create_node({"shape": "VM.Standard.E5.Flex", "ocpus": 8, "memory_gbs": 64,
                                 "assign_public_ip": True},
                                {TAG_RAY_NODE_KIND: "head"}, 1)
    workers = provider.create_node(A10, WORKER, 3)
    (head_id,) = head
    assert len(workers) == 3
    # Five instances in the compartment, pages of two: the provider follows every page and
    # keeps only its cluster's.
    assert sorted(provider.non_terminated_nodes({})) == sorted([head_id, *workers])
    assert sorted(provider.non_terminated_nodes({TAG_RAY_NODE_KIND: "worker"})) == sorted(workers)
    assert provider.non_terminated_nodes({TAG_RAY_NODE_KIND: "worker",
                                          TAG_RAY_NODE_STATUS: "up-to-date"}) == []

    launched = oci_fake.instances[head_id]
    assert launched["shape"] == "VM.Standard.E5.Flex"
    assert launched["shapeConfig"] == {"ocpus": 8.0, "memoryInGBs": 64.0}
    assert launched["sourceDetails"]["imageId"] == "ocid1.image.oc1..ubuntu"
    assert launched["metadata"] == {"ssh_authorized_keys": "ssh-ed25519 AAAA test"}
    assert launched["freeformTags"][TAG_RAY_CLUSTER_NAME] == "gpu"

    # Provisioning: not running, no VNIC yet, so no IP (Ray's updater waits for one).
    assert not provider.is_running(head_id) and not provider.is_terminated(head_id)
    assert provider.internal_ip(head_id) is None
    oci_fake.boot()
    provider.non_terminated_nodes({})
    assert provider.is_running(head_id)
    assert provider.internal_ip(head_id).startswith("10.0.0.")
    assert provider.external_ip(head_id).startswith("203.0.113.")
    worker = sorted(workers)[0]
    assert provider.internal_ip(worker).startswith("10.0.0.")
    assert provider.external_ip(worker) is None       # workers get no public address
    assert provider.get_node_id(provider.internal_ip(worker), use_internal_ip=True) == worker

    # OCI replaces the whole freeform tag set: the provider sends the merged set.
    provider.set_node_tags(worker, {TAG_RAY_NODE_STATUS: "up-to-date"})
    expected = {**WORKER, TAG_RAY_CLUSTER_NAME: "gpu", TAG_RAY_NODE_STATUS: "up-to-date"}
    assert oci_fake.instances[worker]["freeformTags"] == expected
    assert provider.node_tags(worker) == expected
    assert provider.non_terminated_nodes({TAG_RAY_NODE_STATUS: "up-to-date"}) == [worker]

    provider.terminate_nodes([worker, head_id])
    assert oci_fake.instances[worker]["_preserve_boot_volume"] == "false"
    assert provider.is_terminated(worker)
    oci_fake.reap()
    assert sorted(provider.non_terminated_nodes({})) == sorted(set(workers) - {worker})
    assert provider.is_terminated(head_id)
    assert len(other.non_terminated_nodes({})) == 1


def test_a_request_signed_with_another_key_is_refused(oci_fake, tmp_path):
    # The fake checks signatures for real: the same config with a stranger's key gets 401.
    stranger = ApiKey.generate()
    stranger.fingerprint = oci_fake.key.fingerprint        # claims to be our key
    provider = make_provider(oci_fake, stranger.write_config(tmp_path))
    with pytest.raises(oci.exceptions.ServiceError) as err:
        provider.non_terminated_nodes({})
    assert err.value.status == 401
    assert len(oci_fake.rejected) == 1 and "does not verify" in oci_fake.rejected[0]
    oci_fake.rejected.clear()


class SessionSigner(oci.auth.signers.InstancePrincipalsSecurityTokenSigner):
    """Signs as an instance principal does: keyId `ST$<token>`, a session key of its own. Built
    without the metadata service and the federation call the real one makes."""

    def __init__(self, token: str, private_key) -> None:  # noqa: D107 - no super(): no I/O
        self.region = "us-ashburn-1"
        self.create_signers("ST$" + token, private_key, ["date", "(request-target)", "host"],
                            ["content-length", "content-type", "x-content-sha256"])

    def __call__(self, request, enforce_content_headers=True):
        return self.do_request_sign(request, enforce_content_headers)


def test_the_head_authenticates_as_its_instance(oci_fake, tmp_path):
    session_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    oci_fake.keys["ST$session-token"] = session_key.public_key()
    built = []

    def instance_signer():
        built.append(SessionSigner("session-token", session_key))
        return built[-1]

    laptop = make_provider(oci_fake, tmp_path / "absent-config")
    head_config = laptop.prepare_for_head_node({"provider": laptop.provider_config})
    assert head_config["provider"]["auth"] == "instance_principal"
    assert "config_file" not in head_config["provider"]
    head = OCINodeProvider(head_config["provider"], "gpu", client_factory=lambda cfg: build_clients(
        cfg, service_endpoint=oci_fake.url, instance_principal_signer=instance_signer))
    head.create_node(A10, WORKER, 1)
    assert len(head.non_terminated_nodes({})) == 1 and len(built) == 1


def test_throttling_is_retried_with_bounded_backoff(oci_fake, oci_config_file):
    sleeps = Sleeps()
    provider = make_provider(oci_fake, oci_config_file,
                             backoff=Backoff(sleep=sleeps, jitter=lambda lo, hi: hi))
    provider.create_node(A10, WORKER, 1)
    oci_fake.fail("ListInstances", 429, "TooManyRequests", times=3)
    assert len(provider.non_terminated_nodes({})) == 1
    assert sleeps.slept == [0.5, 1.0, 2.0]

    oci_fake.fail("ListInstances", 429, "TooManyRequests", headers={"retry-after": "3"})
    provider.non_terminated_nodes({})
    assert sleeps.slept[-1] == 3.0

    oci_fake.fail("ListInstances", 429, "TooManyRequests", times=10)
    before = oci_fake.calls.count("ListInstances")
    with pytest.raises(oci.exceptions.ServiceError) as err:
        provider.non_terminated_nodes({})
    assert err.value.status == 429
    assert oci_fake.calls.count("ListInstances") - before == Backoff().attempts
    assert max(sleeps.slept) <= Backoff().cap_s


def test_jitter_stays_within_the_cap():
    backoff = Backoff()
    delays = [backoff.delay(attempt, {}) for attempt in range(20) for _ in range(20)]
    assert all(0 <= d <= backoff.cap_s for d in delays) and len(set(delays)) > 1


def test_a_launch_whose_response_was_lost_is_not_launched_twice(oci_fake, oci_config_file):
    provider = make_provider(oci_fake, oci_config_file)
    oci_fake.fail("LaunchInstance", 503, "ServiceUnavailable", after=True)
    created = provider.create_node(A10, WORKER, 1)
    assert oci_fake.calls.count("LaunchInstance") == 2
    assert list(oci_fake.instances) == list(created)


def test_launch_errors_reach_the_autoscaler_as_node_launch_exceptions(oci_fake, oci_config_file):
    provider = make_provider(oci_fake, oci_config_file)
    with pytest.raises(NodeLaunchException) as err:
        provider.create_node({"shape": "BM.GPU.GB200.4"}, WORKER, 1)      # not in this AD
    assert err.value.category == "InvalidParameter"
    assert "BM.GPU.GB200.4" in err.value.description

    # Out of host capacity is a 500: not retried, the autoscaler's availability tracker decides.
    oci_fake.fail("LaunchInstance", 500, "InternalError", "Out of host capacity.")
    with pytest.raises(NodeLaunchException) as err:
        provider.create_node({"shape": "BM.GPU.H100.8"}, WORKER, 1)
    assert "Out of host capacity" in err.value.description
    assert oci_fake.calls.count("LaunchInstance") == 2


def test_unknown_and_vanished_nodes(oci_fake, oci_config_file):
    provider = make_provider(oci_fake, oci_config_file)
    assert provider.is_terminated("ocid1.instance.oc1..gone")
    assert provider.node_tags("ocid1.instance.oc1..gone") == {}
    provider.terminate_node("ocid1.instance.oc1..gone")          # 404: already gone is fine
    oci_fake.fail("GetInstance", 400, "InvalidParameter")
    with pytest.raises(oci.exceptions.ServiceError):
        provider.is_running("ocid1.instance.oc1..other")


def test_a_launch_the_listing_does_not_show_yet_still_counts(oci_fake, oci_config_file):
    now = [1000.0]
    provider = make_provider(oci_fake, oci_config_file, clock=lambda: now[0])
    oci_fake.lag_listing = True
    (node,) = provider.create_node(A10, WORKER, 1)
    assert provider.non_terminated_nodes({}) == [node]
    now[0] += LISTING_LAG_S + 1
    assert provider.non_terminated_nodes({}) == []


def test_tags_written_survive_a_stale_listing(oci_fake, oci_config_file):
    provider = make_provider(oci_fake, oci_config_file)
    (node,) = provider.create_node(A10, WORKER, 1)
    stale = dict(oci_fake.instances[node]["freeformTags"])
    provider.set_node_tags(node, {TAG_RAY_NODE_STATUS: "up-to-date"})
    oci_fake.instances[node]["freeformTags"] = stale          # a read replica behind the write
    assert provider.non_terminated_nodes({TAG_RAY_NODE_STATUS: "up-to-date"}) == [node]
    provider.set_node_tags(node, {"ray-runtime-config": "abc"})
    assert oci_fake.instances[node]["freeformTags"][TAG_RAY_NODE_STATUS] == "up-to-date"


def test_a_terminated_node_stays_gone_in_a_stale_listing(oci_fake, oci_config_file):
    provider = make_provider(oci_fake, oci_config_file)
    (node,) = provider.create_node(A10, WORKER, 1)
    oci_fake.boot()
    provider.terminate_node(node)
    oci_fake.instances[node]["lifecycleState"] = "RUNNING"    # a read replica behind the delete
    assert provider.non_terminated_nodes({}) == [] and provider.is_terminated(node)
    oci_fake.reap()
    oci_fake.instances[node]["lifecycleState"] = "TERMINATED"
    assert provider.non_terminated_nodes({}) == []


def test_network_failures_are_retried_then_raised(oci_config_file):
    sleeps = Sleeps()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))         # bound, never listening: connections are refused
    port = closed.getsockname()[1]
    provider = OCINodeProvider(
        provider_section(oci_config_file), "gpu",
        client_factory=lambda cfg: build_clients(cfg, service_endpoint=f"http://127.0.0.1:{port}"),
        backoff=Backoff(attempts=3, sleep=sleeps, jitter=lambda lo, hi: hi))
    with pytest.raises(oci.exceptions.RequestException):
        provider.non_terminated_nodes({})
    closed.close()
    assert sleeps.slept == [0.5, 1.0]


def test_concurrent_callers_lose_no_tag_and_no_node(oci_fake, oci_config_file):
    provider = make_provider(oci_fake, oci_config_file)
    (node,) = provider.create_node(A10, WORKER, 1)
    barrier = threading.Barrier(12)
    errors: list[BaseException] = []

    def run(fn):
        def target():
            try:
                barrier.wait()
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
        return threading.Thread(target=target)

    threads = [run(lambda i=i: provider.set_node_tags(node, {f"k{i}": str(i)})) for i in range(6)]
    threads += [run(lambda: provider.create_node(A10, WORKER, 1)) for _ in range(3)]
    threads += [run(lambda: provider.non_terminated_nodes({})) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert {f"k{i}" for i in range(6)} <= set(oci_fake.instances[node]["freeformTags"])
    assert len(provider.non_terminated_nodes({})) == 4


def test_bootstrap_checks_the_config_and_carries_the_ssh_key(tmp_path, oci_config_file):
    (tmp_path / "id_ed25519.pub").write_text("ssh-ed25519 AAAAkey me@laptop\n")
    section = provider_section(oci_config_file)
    del section["ssh_authorized_keys"]
    cluster = {"provider": section, "auth": {"ssh_user": "ubuntu",
                                             "ssh_private_key": str(tmp_path / "id_ed25519")},
               "available_node_types": {"gpu": {"node_config": A10}}}
    booted = OCINodeProvider.bootstrap_config(cluster)
    assert booted["provider"]["ssh_authorized_keys"] == "ssh-ed25519 AAAAkey me@laptop"
    assert "ssh_authorized_keys" not in cluster["provider"]

    with pytest.raises(ValueError, match="compartmnet_id"):
        OCINodeProvider.bootstrap_config({**cluster, "provider": {**section,
                                                                   "compartmnet_id": "x"}})
    with pytest.raises(ValueError, match="shpe"):
        OCINodeProvider.bootstrap_config(
            {**cluster, "available_node_types": {"gpu": {"node_config": {"shpe": "x"}}}})
    assert OCIProviderConfig.from_provider(section).compartment_id == COMPARTMENT
    assert OCIProviderConfig.from_provider(section).availability_domain == AD
