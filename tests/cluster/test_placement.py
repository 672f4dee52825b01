"""Where things run on a multi-node cluster: the license actor on the head, GPU-pinned replicas
on GPU worker nodes that Ray's autoscaler started for them, and a replica the license's cap
refuses never starts while the rest keep serving."""

from __future__ import annotations

import httpx
import pytest

from serve_app.licensing.placement import HEAD_RESOURCE, head_node_options
from tests.cluster.conftest import CAP, CHAT
from tests.conftest import wait_for

pytestmark = pytest.mark.cluster


def test_the_license_actor_runs_on_the_head(licensed_app):
    import ray

    licensed_app.settle()
    cluster = licensed_app.cluster
    assert len(cluster.nodes()) >= 2  # the head and at least the GPU node the replica needed
    assert head_node_options() == {"resources": {HEAD_RESOURCE: 0.001}}
    assert licensed_app.status()["license_id"] == licensed_app.license_id
    # The head declares one unit of the resource; its holders are the detached actors placed on
    # the head: this license actor, and the license and key actors other tests made.
    named = ray.util.list_named_actors(all_namespaces=True)
    holders = [a for a in named if a["name"].startswith(("serve_app_keys_", "license_"))]
    assert any(a["name"] == licensed_app.license.actor_name for a in holders)
    assert ray.available_resources()[HEAD_RESOURCE] == pytest.approx(1 - 0.001 * len(holders))


def test_gpu_pinned_replicas_run_on_gpu_worker_nodes(licensed_app):
    licensed_app.settle()
    cluster = licensed_app.cluster
    gpu_nodes = set(cluster.nodes_of_type("gpu_l4"))
    assert gpu_nodes, "the autoscaler started no GPU node for the replica"
    served_by = {licensed_app.chat()["node_id"] for _ in range(5)}
    assert served_by <= gpu_nodes and cluster.head_id() not in served_by


def test_a_replica_over_the_license_cap_does_not_start_and_says_why(licensed_app):
    """A second model deployed while the first holds the cap's places: one replica more than
    the cap allows is refused with the license's reason; the first model keeps serving."""
    from ray import serve

    from serve_app.builder import build_app_from_config
    from serve_app.config import AppConfig, ModelConfig
    from tests.cluster.standins import NodeLLM

    licensed_app.settle()
    live = licensed_app.status()["instances_now"]
    extra = CAP - live + 1
    # CPU stand-ins (no GPU needed): the cap counts every replica of every model.
    model = ModelConfig(name="x", device="cpu", min_replicas=extra, max_replicas=extra)
    config = AppConfig(models=(model,), license=licensed_app.license, http_port=None)
    # Not serve.run: it returns once every replica runs, which one never will.
    serve.run_many([serve.RunTarget(build_app_from_config(config, llm_cls=NodeLLM),
                                    name="extra", route_prefix="/extra")],
                   wait_for_ingress_deployment_creation=False,
                   wait_for_applications_running=False)
    try:
        def refusal() -> str | None:
            app = serve.status().applications.get("extra")
            if app is None:
                return None
            messages = [d.message for d in app.deployments.values()] + [app.message]
            return next((m for m in messages if "instance cap reached" in m), None)

        message = wait_for(refusal, timeout=120, what="the cap's refusal in Serve's status")
        assert f"cap {CAP}" in message and "Not starting this replica" in message
        assert licensed_app.status()["instances_now"] == CAP
        for _ in range(5):
            resp = httpx.post(f"{licensed_app.url}/v1/chat/completions", json=CHAT, timeout=30)
            assert resp.status_code == 200
    finally:
        serve.delete("extra")
    wait_for(lambda: licensed_app.status()["instances_now"] == live, timeout=60,
             what="the extra model's replicas to leave the count")
