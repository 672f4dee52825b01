"""Ray internals the OCI tests use, in one place (pinned ray 2.60.0). If Ray moves them, this
file and its tests break, loudly:

- ``ray.autoscaler._private.util.prepare_config`` / ``validate_config``: what ``ray up`` does to
  a cluster YAML before it calls a provider;
- ``ray.autoscaler._private.node_launcher.BaseNodeLauncher``: how the autoscaler launches nodes;
- ``ray.autoscaler._private.autoscaler.StandardAutoscaler`` with ``LoadMetrics``: the update loop
  that runs on the head, its ``NodeLauncher`` threads included.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import ray

assert ray.__version__ == "2.60.0", f"these helpers are written against ray 2.60.0, not {ray.__version__}"


def render(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's defaults and setup-command merge, then Ray's schema: what `ray up` validates."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


class Launch:
    """Ray's foreground node launcher around a provider, with the bookkeeping it updates."""

    def __init__(self, provider, config: dict[str, Any]) -> None:
        from ray.autoscaler._private.event_summarizer import EventSummarizer
        from ray.autoscaler._private.node_launcher import BaseNodeLauncher
        from ray.autoscaler._private.node_provider_availability_tracker import (
            NodeProviderAvailabilityTracker,
        )
        from ray.autoscaler._private.util import ConcurrentCounter

        self.config = config
        self.pending = ConcurrentCounter()
        self.events = EventSummarizer()
        self.availability = NodeProviderAvailabilityTracker()
        self.launcher = BaseNodeLauncher(
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
    from ray.autoscaler._private.autoscaler import StandardAutoscaler
    from ray.autoscaler._private.load_metrics import LoadMetrics

    return StandardAutoscaler(config_reader, LoadMetrics(), _NoGcs(), update_interval_s=0,
                              max_failures=0)
