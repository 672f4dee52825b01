"""Where the key actor runs and how replicas find it: one per key store, on the head node,
where the store's file is. Placed like the license actor, through licensing's public
``head_node_options`` (a resource the head declares, else the node of the GCS)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from serve_app.licensing import head_node_options
from serve_app.tenants.actor import KeyActor

NAMESPACE = "serve_app"


def actor_name(store_path: str) -> str:
    """One actor per store file: the name follows from the file's absolute path, so apps that
    share a store share an actor, and tests with stores of their own never meet."""
    resolved = str(Path(store_path).expanduser().resolve())
    return f"serve_app_keys_{hashlib.sha256(resolved.encode()).hexdigest()[:16]}"


def get_key_actor(store_path: str) -> Any:
    """The store's actor, created by whichever process asks first."""
    import ray

    name = actor_name(store_path)
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        pass
    return (ray.remote(KeyActor).options(
        name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=-1, num_cpus=0,
        runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}},
        **head_node_options(),
    ).remote(str(Path(store_path).expanduser().resolve())))
