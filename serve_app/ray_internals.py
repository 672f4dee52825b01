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
  Ray's Python proxy actor, which carries more tokens/s per core (docs/performance.md).
  `python -m serve_app` needs neither: its colocated replicas listen on the public port
  themselves (listener.py).
- ``RAY_SERVE_HAPROXY_METRICS_ENABLED=0``: HAProxy's per-request log lines feed Serve's ingress
  metrics through a Python parser on the frontend core; our /metrics counts requests itself.
- ``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=2``: a stopping ingress replica keeps
  serving for a drain period so that load balancers notice; Serve tells HAProxy itself within
  ~0.1 s, so 2 s replace the 30 s meant for cloud balancers (Ctrl-C, scale-down). Where the
  replicas listen on the public port themselves (``own_port_switches``) nothing balances over
  them, and the period is 0.
- ``RAY_worker_niceness=0``: Ray starts workers at niceness 15; vLLM's engine core, at normal
  priority, then preempts the serving path on the shared core, and TTFT grows several-fold.
  Raw `vllm serve` runs everything at niceness 0, and so do we.
- ``RAY_enable_worker_prestart=0``, ``RAY_prestart_worker_first_driver=0``: prestarted idle
  workers (~80 MB each) serve no purpose for a fixed set of long-lived replicas.
- ``RAY_SERVE_CONTROL_LOOP_INTERVAL_S=0.5``: Serve's controller loops every 0.1 s by default,
  the largest share of an idle stack's CPU; at 0.5 s it reacts to a dead replica or a scaling
  decision 0.4 s later (autoscaling delays are counted in seconds, not loops).

Session affinity at a cluster's front door (``SESSION_AFFINITY_ENV``, set where the head's
Ray starts: the clusters' start commands): Serve renders HAProxy's ``defaults`` section with the
line ``balance {{ config.balance_algorithm }}`` from ``RAY_SERVE_HAPROXY_BALANCE_ALGORITHM``
(``ray.serve._private.haproxy_templates``; Serve's default is ``leastconn``), unescaped. The
value here is two lines, HAProxy's ``balance hdr(x-session-id)`` and ``hash-type consistent``:
one session's requests go to one replica, and a replica coming or going moves only the sessions
it held. HAProxy has no other way to say consistent hashing, and Serve no other switch that
reaches the section. Requests without the header are balanced round robin (HAProxy's fallback
for a missing header), not by least connections. ``missing()`` checks the template line.

Serve's HTTP address, read back from Serve's controller (``serve_http_host``): the named actor
``SERVE_CONTROLLER_ACTOR`` in namespace ``serve`` (``ray.serve._private.constants``) and its
``get_http_config`` / ``get_proxy_location`` methods, which Serve's replicas call themselves to
start their direct-ingress servers on the same host. An app that refuses to serve the network
without a key must know whether Serve put it on the network.

Serve's late-bound ASGI hook: ``serve.ingress()`` without an app plus an async
``__serve_build_asgi_app__`` method on the class (``deployments.py``). The replica calls it
after the constructor, so the HTTP app can be built from state the async constructor made
(the engine, the listener). Ray Serve's own LLM app uses it; it is not documented.
"""

from __future__ import annotations

import importlib
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

DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"


def own_port_switches(env: dict[str, str]) -> dict[str, str]:
    """The switches to change where the replicas listen on the public port themselves
    (``AppConfig.http_port``, `python -m serve_app`): no balancer needs a drain period, as a
    stopping replica's socket leaves the kernel's SO_REUSEPORT group when it closes and its
    listener drains the responses in flight itself, so Serve's period would only hold every
    stop (Ctrl-C, `docker stop`, scale-down) for its length. A value other than ours stays."""
    if env.get(DRAIN_ENV, RAY_SERVE_ENV[DRAIN_ENV]) == RAY_SERVE_ENV[DRAIN_ENV]:
        return {DRAIN_ENV: "0"}
    return {}


# Where the cluster's front door (the head's HAProxy) runs: see the module docstring.
SESSION_AFFINITY_ENV = {
    "RAY_SERVE_HAPROXY_BALANCE_ALGORITHM": "hdr(x-session-id)\n    hash-type consistent",
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

ASGI_HOOK = "__serve_build_asgi_app__"

# Ray's ``Node.__init__`` (``ray/_private/node.py``) gives its raylet 30 s, a constant, to
# register with the GCS, and one slow GCS call can use all of it: a container's first start was
# seen to fail so, once, on an otherwise idle box. Only the message tells that failure apart.
NODE_START_TIMEOUT = "The current node timed out during startup"


def is_node_start_timeout(exc: BaseException) -> bool:
    """Whether ``ray.init`` failed because its new node did not register in time."""
    return NODE_START_TIMEOUT in str(exc)


# What the tests use of Ray's internals (the cluster layer's auth reload and loopback switch, the
# OCI provider driven by Ray's own autoscaler, Serve's import_attr): named here, so that
# ``missing()`` checks them too and they reach Ray's private modules through this one (``symbol``).
TEST_IMPORTS = (
    ("ray._raylet", "AuthenticationTokenLoader"),
    ("ray._raylet", "Config"),
    ("ray._private", "ray_constants"),
    ("ray._private.authentication.authentication_token_setup", "_get_default_token_path"),
    ("ray.autoscaler._private.autoscaler", "StandardAutoscaler"),
    ("ray.autoscaler._private.load_metrics", "LoadMetrics"),
    ("ray.autoscaler._private.event_summarizer", "EventSummarizer"),
    ("ray.autoscaler._private.node_launcher", "BaseNodeLauncher"),
    ("ray.autoscaler._private.node_provider_availability_tracker",
     "NodeProviderAvailabilityTracker"),
    ("ray.autoscaler._private.util", "ConcurrentCounter"),
    ("ray.serve._private.utils", "import_attr"),
    ("ray.serve._private.haproxy", "HAProxyApi"),
    ("ray.serve._private.haproxy", "HAProxyConfig"),
    ("ray.serve._private.haproxy", "BackendConfig"),
    ("ray.serve._private.haproxy", "ServerConfig"),
)


async def serve_http_host() -> str | None:
    """The address Serve's HTTP proxies and its replicas' direct-ingress servers bind, or None
    when Serve runs no HTTP proxy (``proxy_location: Disabled``) or this process is no Ray
    worker (a deployment class constructed by a test). Called from a replica, where Serve's
    controller runs."""
    import ray

    if not ray.is_initialized():
        return None
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    from ray.serve.config import ProxyLocation

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    location = await controller.get_proxy_location.remote()
    if location is None or location == ProxyLocation.Disabled:
        return None
    return (await controller.get_http_config.remote()).host


def symbol(name: str) -> Any:
    """A name of ``TEST_IMPORTS``, from the module listed with it (a submodule is imported)."""
    module = next(m for m, n in TEST_IMPORTS if n == name)
    found = importlib.import_module(module)
    if not hasattr(found, name):
        importlib.import_module(f"{module}.{name}")
    return getattr(found, name)


def missing() -> list[str]:
    """What this module relies on that the installed Ray lacks (empty when all fit)."""
    import inspect

    from ray._private.node import Node
    from ray.serve._private import constants, replica

    out = [] if NODE_START_TIMEOUT in inspect.getsource(Node.__init__) else [
        "Ray's Node no longer raises the node start timeout ray_internals retries on"]
    out += [f"ray.serve._private.constants has no {name}" for name in SERVE_CONSTANTS.values()
           if not hasattr(constants, name)]
    from ray.serve._private import haproxy_templates

    if "    balance {{ config.balance_algorithm }}\n" not in haproxy_templates.HAPROXY_CONFIG_TEMPLATE:
        out.append("Serve's HAProxy template no longer has the balance line of its defaults")
    if getattr(constants, "SERVE_CONTROLLER_NAME", None) != "SERVE_CONTROLLER_ACTOR":
        out.append("Serve's controller is no longer the actor SERVE_CONTROLLER_ACTOR")
    from ray.serve._private.controller import ServeController

    out += [f"Serve's controller has no {m}" for m in ("get_http_config", "get_proxy_location")
            if not callable(getattr(ServeController, m, None))]
    if getattr(replica, "SERVE_BUILD_ASGI_APP_METHOD", None) != ASGI_HOOK:
        out.append(f"Serve's replica no longer calls {ASGI_HOOK}")
    if not callable(getattr(replica, "add_port_to_grpc_server", None)):
        out.append("ray.serve._private.replica has no add_port_to_grpc_server to rebind")
    for module, names in (("ray.autoscaler._private.util", ("prepare_config", "validate_config")),
                          ("ray.autoscaler._private.commands", ("_set_up_config_for_head_node",))):
        found = importlib.import_module(module)
        out += [f"{module} has no {name}" for name in names if not hasattr(found, name)]
    for module, name in TEST_IMPORTS:
        try:
            symbol(name)
        except (ImportError, AttributeError) as exc:
            out.append(f"{module}.{name}: {exc}")
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


# -- cluster configs, rendered as `ray up` renders them ---------------------------------------


def prepare_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` as ``ray up`` prepares it, then checked against Ray's schema.

    Relies on ``ray.autoscaler._private.util.prepare_config`` and ``validate_config``."""
    import copy
    import logging

    from ray.autoscaler._private.util import prepare_config, validate_config

    # Its INFO lines ("setting max workers for head node type to 0") are for `ray up`'s own log.
    util_logger = logging.getLogger("ray.autoscaler._private.util")
    level = util_logger.level
    util_logger.setLevel(logging.WARNING)
    try:
        prepared = prepare_config(copy.deepcopy(config))
    finally:
        util_logger.setLevel(level)
    validate_config(prepared)
    return prepared


def head_bootstrap_config(rendered: dict[str, Any]) -> dict[str, Any]:
    """The config ``ray up`` writes to the head for the autoscaler there.

    Relies on ``ray.autoscaler._private.commands._set_up_config_for_head_node``, given the base
    ``NodeProvider`` (whose ``prepare_for_head_node`` changes nothing) so no cloud is called."""
    import copy
    import json

    from ray.autoscaler._private.commands import _set_up_config_for_head_node
    from ray.autoscaler.node_provider import NodeProvider

    provider = NodeProvider(rendered["provider"], rendered["cluster_name"])
    _, remote_file = _set_up_config_for_head_node(copy.deepcopy(rendered), provider, False)
    try:
        with open(remote_file.name) as f:
            return json.load(f)
    finally:
        remote_file.close()
