"""Where the license actor runs, and how replicas find it: one per cluster, on the head node,
whose ledger outlives worker nodes.

Public means only, in this order: a custom resource the head node declares (``HEAD_RESOURCE``;
cluster configs put it in the head node type's ``resources``), else node affinity to the node
that runs the cluster's GCS, found through ``ray.nodes()`` and the runtime context (a single box
started by plain ``ray.init()`` needs nothing). Ray's own ``node:__internal_head__`` resource is
not used: it is internal and may change.
"""

from __future__ import annotations

from typing import Any

from serve_app.licensing.actor import LicenseActor
from serve_app.licensing.config import LicenseConfig

# Declared by the head node (`ray start --head --resources='{"serve_app_head": 1}'`, or a
# cluster config's head node type) for actors that must live there.
HEAD_RESOURCE = "serve_app_head"


class HeadNodeNotFoundError(RuntimeError):
    """The cluster's head node cannot be told apart by public means."""


def head_node_options() -> dict[str, Any]:
    """Actor options that place an actor on the head node (see the module docstring)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if ray.cluster_resources().get(HEAD_RESOURCE):
        return {"resources": {HEAD_RESOURCE: 0.001}}
    alive = [n for n in ray.nodes() if n["Alive"]]
    gcs_host = ray.get_runtime_context().gcs_address.rsplit(":", 1)[0]
    at_gcs = [n for n in alive if n["NodeManagerAddress"] == gcs_host]
    candidates = alive if len(alive) == 1 else at_gcs
    if len(candidates) != 1:
        raise HeadNodeNotFoundError(
            f"Cannot tell the head node apart ({len(alive)} nodes, {len(at_gcs)} at the GCS "
            f"address {gcs_host}): declare the resource {HEAD_RESOURCE!r} on the head node "
            f"(ray start --head --resources='{{\"{HEAD_RESOURCE}\": 1}}', or the head node "
            "type's resources in the cluster config).")
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(candidates[0]["NodeID"],
                                                                   soft=False)}


def get_license_actor(config: LicenseConfig) -> Any:
    """The cluster's singleton, created by whichever process asks first, on the head node:
    the ledger lives there, and the head outlives worker nodes."""
    import ray

    try:  # the usual case, and no need to find the head
        return ray.get_actor(config.actor_name, namespace=config.namespace)
    except ValueError:
        pass
    return (ray.remote(LicenseActor).options(
        name=config.actor_name, namespace=config.namespace, lifetime="detached",
        get_if_exists=True, max_restarts=-1, max_task_retries=-1, num_cpus=0,
        runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}},
        **head_node_options(),
    ).remote(config))
