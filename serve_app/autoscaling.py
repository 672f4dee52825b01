"""Autoscaling of colocated replicas on the requests they serve themselves.

Serve's default policy scales on the requests Serve routed (its proxy, handles). A colocated
replica takes most of its traffic on its own listener (``listener.py``), which Serve never sees;
each replica reports its in-flight generation requests instead (``record_autoscaling_stats``)
and this policy scales on those, with the same rule as Serve's default: replicas = requests /
``target_ongoing_requests``. Serve applies min/max, the up/down-scaling factors and delays on
top (it wraps every custom policy that way).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

METRIC = "in_flight"


def desired_replicas(per_replica: Mapping[Any, float], target_per_replica: float,
                     current_target: int) -> float:
    """Pure: the replica count for the reported in-flight requests (``current_target`` until
    some replica has reported)."""
    if not per_replica:
        return current_target
    return sum(per_replica.values()) / target_per_replica


def in_flight_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """``autoscaling_config.policy.policy_function`` of the colocated deployment."""
    reported = (ctx.aggregated_metrics or {}).get(METRIC, {})
    target = ctx.config.get_target_ongoing_requests()
    return desired_replicas(reported, target, ctx.target_num_replicas), {}
