"""What the GCP preflight decides, as pure functions of a cluster YAML and the API's answers.

Accelerator-optimized machine types come with their GPUs (G2: L4, A2: A100 40/80 GB, A3: H100);
a region's quota for them is counted in GPUs, per metric, and preemptible (spot) VMs draw on
separate ``PREEMPTIBLE_*`` metrics.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from infra.gcp.compute import PreflightError, Quota

# GCP's accelerator name -> the regional quota metric its GPUs count against.
QUOTA_METRICS = {
    "nvidia-l4": "NVIDIA_L4_GPUS",
    "nvidia-tesla-a100": "NVIDIA_A100_GPUS",
    "nvidia-a100-80gb": "NVIDIA_A100_80GB_GPUS",
    "nvidia-h100-80gb": "NVIDIA_H100_GPUS",
}
SERVING_PORT = 9000
FIREWALL_NAME = "serve-app-http"


@dataclass(frozen=True)
class GpuNodeType:
    """A worker type of the cluster YAML that carries GPUs."""

    name: str
    ray_types: tuple[str, ...]
    accelerator: str
    per_node: int
    max_workers: int
    preemptible: bool

    @property
    def quota_metric(self) -> str:
        metric = QUOTA_METRICS.get(self.accelerator)
        if metric is None:
            raise PreflightError(f"no known quota metric for {self.accelerator}; known: "
                                 f"{', '.join(QUOTA_METRICS)}")
        return f"PREEMPTIBLE_{metric}" if self.preemptible else metric


def gpu_node_types(config: dict[str, Any]) -> list[GpuNodeType]:
    out = []
    for name, node_type in config["available_node_types"].items():
        node = node_type.get("node_config", {})
        accelerators = node.get("guestAccelerators") or []
        if not accelerators:
            continue
        scheduling = node.get("scheduling") or {}
        out.append(GpuNodeType(
            name=name,
            ray_types=tuple(sorted(k.split(":", 1)[1] for k in node_type.get("resources", {})
                                   if k.startswith("accelerator_type:"))),
            accelerator=accelerators[0]["acceleratorType"],
            per_node=int(accelerators[0].get("acceleratorCount", 1)),
            max_workers=int(node_type.get("max_workers", config.get("max_workers", 0))),
            preemptible=bool(scheduling.get("preemptible"))
            or scheduling.get("provisioningModel") == "SPOT",
        ))
    return out


def pick(types: list[GpuNodeType], ray_type: str) -> list[GpuNodeType]:
    """The worker types a deployment with ``accelerator_type: ray_type`` can land on."""
    chosen = [t for t in types if ray_type in t.ray_types]
    if not chosen:
        offered = sorted({r for t in types for r in t.ray_types})
        raise PreflightError(f"no worker type of the cluster YAML offers accelerator_type "
                             f"{ray_type!r}; it offers {', '.join(offered) or 'none'}")
    return chosen


def zone_lines(node_type: GpuNodeType, offered: dict[str, int], region: str,
               zone: str | None) -> tuple[bool, list[str]]:
    """Which zones of ``region`` offer the type's GPU, and whether the configured zone does."""
    in_region = sorted(z for z, most in offered.items()
                       if z.rsplit("-", 1)[0] == region and most >= node_type.per_node)
    if not in_region:
        elsewhere = sorted({z.rsplit("-", 1)[0] for z in offered})
        return False, [f"{node_type.accelerator}: no zone of {region} offers it"
                       + (f"; regions that do: {', '.join(elsewhere)}" if elsewhere else "")]
    lines = [f"{node_type.accelerator}: zones of {region} offering it: {', '.join(in_region)}"]
    if zone is not None and zone not in in_region:
        lines.append(f"provider.availability_zone {zone} does not offer it: use one of the above")
        return False, lines
    return True, lines


def quota_line(node_type: GpuNodeType, quotas: dict[str, Quota],
               region: str) -> tuple[bool, str]:
    """Enough quota for one node is required; short of max_workers nodes is a warning."""
    metric = node_type.quota_metric
    quota = quotas.get(metric)
    left = 0.0 if quota is None else quota.left
    wanted = node_type.per_node * node_type.max_workers
    head = f"quota {metric} in {region}: {left:g} of {0 if quota is None else quota.limit:g} left"
    if left < node_type.per_node:
        return False, (f"{head}; one {node_type.name} node needs {node_type.per_node}. Request "
                       "more in the console (IAM & Admin > Quotas) before `ray up`.")
    if left < wanted:
        return True, (f"{head}; enough for {int(left // node_type.per_node)} of max_workers "
                      f"{node_type.max_workers} {node_type.name} nodes")
    return True, f"{head}; enough for max_workers {node_type.max_workers} nodes"


def source_ranges(ranges: list[str]) -> list[str]:
    """The customer's CIDRs, normalized; the whole internet is refused."""
    out = []
    for text in ranges:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise PreflightError(f"{text!r} is not an address or CIDR range") from None
        if net.prefixlen == 0:
            raise PreflightError(f"{text} opens the port to the whole internet; give your "
                                 "clients' own range (e.g. 203.0.113.0/24)")
        out.append(str(net))
    return sorted(set(out))


def firewall_rule(name: str, network: str, port: int, ranges: list[str],
                  target_tag: str) -> dict[str, Any]:
    """The one ingress rule: ``port`` over TCP, from ``ranges``, to VMs tagged ``target_tag``."""
    return {
        "name": name,
        "network": network if "/" in network else f"global/networks/{network}",
        "direction": "INGRESS",
        "priority": 1000,
        "sourceRanges": source_ranges(ranges),
        "allowed": [{"IPProtocol": "tcp", "ports": [str(port)]}],
        "targetTags": [target_tag],
        "description": "serve_app: the serving port, for the customer's clients only",
    }


def firewall_patch(existing: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """Fields of ``wanted`` that ``existing`` lacks or differs in; empty when up to date."""
    if existing.get("network", "").rsplit("/", 3)[-3:] != wanted["network"].rsplit("/", 3)[-3:]:
        raise PreflightError(f"firewall rule {wanted['name']} exists on another network "
                             f"({existing.get('network')}); pick another --name")
    patch = {}
    for key, value in wanted.items():
        if key in ("name", "network"):
            continue
        have = existing.get(key)
        if key in ("sourceRanges", "targetTags"):
            have = sorted(have or [])
        if have != value:
            patch[key] = value
    return patch


# Ports that must never face the internet: Ray's GCS, object manager, dashboard, client server
# and dashboard agent (any of them runs code for whoever reaches it), and the serving port.
GUARDED_PORTS = {6379: "Ray GCS", 8076: "Ray object manager", 8265: "Ray dashboard",
                 10001: "Ray client", 52365: "Ray dashboard agent", SERVING_PORT: "serving port"}


def exposed_rules(rules: list[dict[str, Any]], network: str, tags: set[str]) -> list[str]:
    """Enabled ingress rules of ``network`` that open a guarded port to the whole internet on
    the cluster's VMs (rules without targets apply to every VM of the network)."""
    problems = []
    for rule in rules:
        if (rule.get("direction", "INGRESS") != "INGRESS" or rule.get("disabled")
                or rule.get("network", "").rsplit("/", 1)[-1] != network.rsplit("/", 1)[-1]
                or not any(_prefix_len(r) == 0 for r in rule.get("sourceRanges", []))):
            continue
        targets = set(rule.get("targetTags", []))
        if rule.get("targetServiceAccounts") or (targets and not targets & tags):
            continue
        ports = sorted(p for p in GUARDED_PORTS if _allows(rule.get("allowed", []), p))
        if ports:
            names = ", ".join(f"{p} ({GUARDED_PORTS[p]})" for p in ports)
            problems.append(f"firewall rule {rule['name']} opens {names} to the whole internet: "
                            f"delete it or narrow its sourceRanges")
    return problems


def _prefix_len(cidr: str) -> int:
    try:
        return ipaddress.ip_network(cidr, strict=False).prefixlen
    except ValueError:
        return -1


def _allows(allowed: list[dict[str, Any]], port: int) -> bool:
    for entry in allowed:
        if entry.get("IPProtocol") not in ("tcp", "all", "6"):
            continue
        if not entry.get("ports"):
            return True
        for spec in entry["ports"]:
            low, _, high = spec.partition("-")
            if int(low) <= port <= int(high or low):
                return True
    return False


def cluster_tags(config: dict[str, Any]) -> set[str]:
    return {tag for t in config["available_node_types"].values()
            for tag in t.get("node_config", {}).get("tags", {}).get("items", [])}


def head_target_tag(config: dict[str, Any]) -> str | None:
    """The head's network tag: what the serving rule targets (workers are not exposed)."""
    head = config["available_node_types"][config["head_node_type"]]
    items = head.get("node_config", {}).get("tags", {}).get("items", [])
    return items[0] if items else None


def family_image(source_image: str) -> tuple[str, str] | None:
    """(project, family) of ``projects/P/global/images/family/F``; None for a pinned image."""
    parts = source_image.split("/")
    if len(parts) == 6 and parts[0] == "projects" and parts[4] == "family":
        return parts[1], parts[5]
    return None
