"""Ray's autoscaler driving the OCI node provider, as ``ray up``'s head runs it. The internals
it takes (the node launcher, ``StandardAutoscaler`` with ``LoadMetrics``) come through the fence,
``serve_app.ray_internals.symbol``, which lists and checks them with the pinned release.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

from serve_app import ray_internals

assert ray.__version__ == "2.60.0", f"these helpers are written against ray 2.60.0, not {ray.__version__}"


def render(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's defaults and setup-command merge, then Ray's schema: what `ray up` validates."""
    return ray_internals.prepare_cluster_config(config)


class Launch:
    """Ray's foreground node launcher around a provider, with the bookkeeping it updates."""

    def __init__(self, provider, config: dict[str, Any]) -> None:
        self.config = config
        self.pending = ray_internals.symbol("ConcurrentCounter")()
        self.events = ray_internals.symbol("EventSummarizer")()
        self.availability = ray_internals.symbol("NodeProviderAvailabilityTracker")()
        self.launcher = ray_internals.symbol("BaseNodeLauncher")(
            provider=provider, pending=self.pending, event_summarizer=self.events,
            node_provider_availability_tracker=self.availability,
            node_types=config["available_node_types"])

    def __call__(self, node_type: str, count: int) -> dict[str, Any]:
        self.pending.inc(node_type, count)
        return self.launcher.launch_node(self.config, count, node_type)

    def unavailable(self) -> dict[str, str]:
        """Node type -> the launch error the autoscaler holds against it."""
        summary = self.availability.summary().node_availabilities
        return {t: r.unavailable_node_information.description for t, r in summary.items()
                if not r.is_available}


class _NoGcs:
    """The GCS client StandardAutoscaler drains nodes through before terminating them."""

    def __init__(self) -> None:
        self.drained: list[list[bytes]] = []

    def drain_nodes(self, node_ids, timeout=None):
        self.drained.append(list(node_ids))
        return list(node_ids)


def autoscaler(config_reader: Callable[[], dict[str, Any]]):
    """Ray's StandardAutoscaler over `config_reader()`; it builds the provider itself (through
    `provider.module`) and launches nodes from its NodeLauncher threads."""
    autoscaler_cls = ray_internals.symbol("StandardAutoscaler")
    return autoscaler_cls(config_reader, ray_internals.symbol("LoadMetrics")(), _NoGcs(),
                          update_interval_s=0, max_failures=0)
