"""Every use of a Ray internal or private switch, for the pinned release (``versions``).

Private switches, read from the environment by Ray's processes when they start (so they must
be in the environment before ``ray start`` / ``ray.init``; ``RAY_SERVE_ENV`` is what the CLI
and the Makefile set, and a user's own value wins). Ray Serve reads the ``RAY_SERVE_*`` ones
into ``ray.serve._private.constants`` at import; the raylet reads the ``RAY_<name>`` ones into
its ``RayConfig``. None is a documented API; a release may rename or drop any of them, which
would silently turn the setting off. ``serve_switches()`` reads Serve's back from its own
constants and the e2e suite checks each one took effect (the raylet's through the raylet's
environment and the workers' niceness).

- ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: user code on the replica's main loop, gRPC between
  replicas, direct ingress (ingress replicas run their own HTTP server).
- ``RAY_SERVE_ENABLE_HA_PROXY=1``: Serve's HTTP port (when Serve's proxy runs: `serve run`, the
  router layout) is an HAProxy (C, ~10 MB) balancing over those replica servers instead of
  Ray's Python proxy actor. Measured on a 2-core box, 1.5M-parameter model, streaming, c=1:
  through Serve's proxy 2126 system tok/s, through HAProxy 3031-3111. `python -m serve_app`
  needs neither: its colocated replicas listen on the public port themselves (listener.py).
- ``RAY_SERVE_HAPROXY_METRICS_ENABLED=0``: HAProxy's per-request log lines feed Serve's ingress
  metrics through a Python parser on the frontend core; our /metrics counts requests itself.
- ``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=2``: a stopping ingress replica keeps
  serving for a drain period so that load balancers notice; Serve tells HAProxy itself within
  ~0.1 s, so 2 s replace the 30 s meant for cloud balancers (Ctrl-C, scale-down).
- ``RAY_worker_niceness=0``: Ray starts workers at niceness 15; vLLM's engine core, at normal
  priority, then preempts the serving path on the shared core (TTFT p50 82 -> 637 ms at
  concurrency 1). Raw `vllm serve` runs everything at niceness 0, and so do we.
- ``RAY_enable_worker_prestart=0``, ``RAY_prestart_worker_first_driver=0``: prestarted idle
  workers (~80 MB each) serve no purpose for a fixed set of long-lived replicas.
- ``RAY_SERVE_CONTROL_LOOP_INTERVAL_S=0.5``: Serve's controller loops every 0.1 s by default:
  idle, the whole stack used 68 ms of CPU per second, 21 of them the controller; at 0.5 s, 48
  (the controller 8). It reacts to a dead replica or a scaling decision 0.4 s later
  (autoscaling delays are counted in seconds, not loops).

Serve's late-bound ASGI hook: ``serve.ingress()`` without an app plus an async
``__serve_build_asgi_app__`` method on the class (``deployments.py``). The replica calls it
after the constructor, so the HTTP app can be built from state the async constructor made
(the engine, the listener). Ray Serve's own LLM app uses it; it is not documented.

Head-node placement of the license actor (its ledger lives on the head, which outlives worker
nodes) uses public means only, in this order: a custom resource the head node declares
(``HEAD_RESOURCE``; cluster configs put it in the head node type's ``resources``), else node
affinity to the node that runs the cluster's GCS, found through ``ray.nodes()`` and the
runtime context (a single box started by plain ``ray.init()`` needs nothing). Ray's own
``node:__internal_head__`` resource is not used: it is internal and may change.
"""

from __future__ import annotations

from typing import Any

RAY_SERVE_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    "RAY_worker_niceness": "0",
    "RAY_enable_worker_prestart": "0",
    "RAY_prestart_worker_first_driver": "0",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
}

# Each Serve switch and the name under which Ray Serve keeps its effective value.
SERVE_CONSTANTS = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "RAY_SERVE_THROUGHPUT_OPTIMIZED",
    "RAY_SERVE_ENABLE_HA_PROXY": "RAY_SERVE_ENABLE_HA_PROXY",
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "RAY_SERVE_HAPROXY_METRICS_ENABLED",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S":
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "CONTROL_LOOP_INTERVAL_S",
}
# Read by the raylet (RayConfig) from its own environment when it starts.
RAYLET_SWITCHES = ("RAY_worker_niceness", "RAY_enable_worker_prestart",
                   "RAY_prestart_worker_first_driver")

# Declared by the head node (`ray start --head --resources='{"serve_app_head": 1}'`, or a
# cluster config's head node type) for actors that must live there.
HEAD_RESOURCE = "serve_app_head"


ASGI_HOOK = "__serve_build_asgi_app__"


def missing() -> list[str]:
    """What this module relies on that the installed Ray lacks (empty when all fit)."""
    from ray.serve._private import constants, replica

    out = [f"ray.serve._private.constants has no {name}" for name in SERVE_CONSTANTS.values()
           if not hasattr(constants, name)]
    if getattr(replica, "SERVE_BUILD_ASGI_APP_METHOD", None) != ASGI_HOOK:
        out.append(f"Serve's replica no longer calls {ASGI_HOOK}")
    return out


def serve_switches() -> dict[str, Any]:
    """The value Ray Serve runs with for each ``SERVE_CONSTANTS`` switch, in this process."""
    from ray.serve._private import constants

    return {env: getattr(constants, name) for env, name in SERVE_CONSTANTS.items()}


def as_switch_value(text: str, like: Any) -> Any:
    """``text`` (an environment value) parsed the way Serve parses its constant ``like``."""
    if isinstance(like, bool):
        return text == "1"
    return type(like)(text)


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


# -- a single box on loopback ------------------------------------------------------------------

LOOPBACK = "127.0.0.1"


def single_box_ray_env() -> dict[str, str]:
    """The environment that keeps a local Ray on loopback: its GCS, raylet, agents and workers
    then listen on 127.0.0.1 and dial it, instead of listening on every interface and dialling
    the machine's network address (Ray's default on Linux, where a local instance is also
    the head of a possible cluster).

    Relies on Ray's ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` switch (``ray._private.ray_constants
    .ENABLE_RAY_CLUSTER``; false is Ray's own default on macOS and Windows), which Ray reads
    once, when ``ray`` is first imported: set it before that import. ``ray.init``'s
    ``_node_ip_address`` does not do it (Ray binds its servers to every interface and
    resolves 127.0.0.1 to the interface address anyway). ``check_loopback`` verifies the effect.
    """
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def check_loopback() -> None:
    """Refuse to go on when the local Ray did not come up on loopback (``ray`` was imported
    before ``single_box_ray_env`` was in the environment)."""
    import ray

    host = ray.get_runtime_context().gcs_address.rsplit(":", 1)[0]
    if host != LOOPBACK:
        raise RuntimeError(
            f"Ray's GCS is at {host}, not on loopback: it would listen on the network. Set "
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray is imported.")


def keep_serve_grpc_on_loopback() -> None:
    """On a single box (Ray itself on loopback), bind Ray Serve's inter-deployment gRPC server
    of this replica to 127.0.0.1 instead of every interface: nothing off the box may reach it,
    and on one box nothing needs to. A no-op when Ray runs on a network address (a cluster).

    Relies on a Ray Serve internal: ``ray.serve._private.replica`` (Ray 2.60) starts that
    server in ``_on_initialized``, after the deployment's constructor has run, by calling its
    module-level name ``add_port_to_grpc_server(server, "[::]:0")`` (from
    ``ray._common.tls_utils``); the address is hard-coded. The e2e listening-socket test
    fails if this stops working.
    """
    import ray

    if not ray.is_initialized() or ray.util.get_node_ip_address() != "127.0.0.1":
        return
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server
    if getattr(original, "on_loopback", False):
        return

    def add_port_on_loopback(server: object, address: str) -> int:
        host, _, port = address.rpartition(":")
        if host in ("[::]", "0.0.0.0", ""):
            address = f"127.0.0.1:{port}"
        return original(server, address)

    add_port_on_loopback.on_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port_on_loopback
