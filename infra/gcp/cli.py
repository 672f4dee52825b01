"""``python -m infra.gcp``: checks before ``ray up ray_cluster.yaml``, and the serving port's
firewall rule.

    python -m infra.gcp check --config ray_cluster.yaml --accelerator L4
    python -m infra.gcp firewall --config ray_cluster.yaml --source-range 203.0.113.0/24

Exit status: 0 when ready, 1 with problems (each printed with what to do), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from infra import cluster_yaml
from infra.gcp import preflight
from infra.gcp.compute import GoogleCompute, PreflightError, connect


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m infra.gcp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default="ray_cluster.yaml",
                        help="the cluster YAML (default: ray_cluster.yaml)")
    common.add_argument("--project", help="GCP project id (default: the YAML's provider."
                        "project_id, else gcloud's application-default project)")

    check = commands.add_parser(
        "check", parents=[common],
        help="the YAML, Ray's token and the license, the accelerator's zones and quota")
    check.add_argument("--region", help="default: the YAML's provider.region")
    check.add_argument("--network", default="default",
                       help="VPC network of the cluster, whose firewall rules are checked "
                       "(default: default)")
    check.add_argument("--accelerator", default="L4",
                       help="Ray accelerator type the Serve config asks for: L4, A100-40G, "
                       "A100-80G or H100 (default: L4)")

    firewall = commands.add_parser(
        "firewall", parents=[common],
        help="create or update the rule opening the serving port to your CIDR only")
    firewall.add_argument("--source-range", action="append", required=True, metavar="CIDR",
                          help="clients' address range; repeat for several")
    firewall.add_argument("--port", type=int, default=preflight.SERVING_PORT,
                          help=f"serving port (default {preflight.SERVING_PORT})")
    firewall.add_argument("--network", default="default", help="VPC network (default: default)")
    firewall.add_argument("--name", default=preflight.FIREWALL_NAME,
                          help=f"rule name (default {preflight.FIREWALL_NAME})")
    firewall.add_argument("--target-tag",
                          help="network tag of the VMs to open (default: the head's tag in the YAML)")
    return parser


def run_check(ns: argparse.Namespace, compute: Callable[[str | None], GoogleCompute]) -> int:
    problems = cluster_yaml.check(ns.config)
    for problem in problems:
        print(f"problem: {problem}")
    raw = cluster_yaml.load(ns.config)
    provider = raw["provider"]
    region = ns.region or provider["region"]
    api = compute(ns.project or provider.get("project_id"))
    print(f"project {api.project}, region {region}")
    chosen = preflight.pick(preflight.gpu_node_types(raw), ns.accelerator)
    quotas = api.region_quotas(region)
    for node_type in chosen:
        offered = api.accelerator_zones(node_type.accelerator)
        ok, lines = preflight.zone_lines(node_type, offered, region,
                                         provider.get("availability_zone"))
        ok_quota, quota = preflight.quota_line(node_type, quotas, region)
        for line in lines + [quota]:
            print(f"  {node_type.name}: {line}")
        problems += [] if ok else [lines[-1]]
        problems += [] if ok_quota else [quota]
    exposed = preflight.exposed_rules(api.firewalls(), ns.network, preflight.cluster_tags(raw))
    for problem in exposed:
        print(f"problem: {problem}")
    problems += exposed
    images = {disk["initializeParams"]["sourceImage"]
              for t in raw["available_node_types"].values()
              for disk in t["node_config"].get("disks", []) if "initializeParams" in disk}
    for image in sorted(images):
        family = preflight.family_image(image)
        if family:
            name = api.image_from_family(*family)
            print(f"image family {family[1]} is now projects/{family[0]}/global/images/{name}: "
                  "put that sourceImage in the YAML to pin it")
    print(f"{len(problems)} problem(s)" if problems else "ready for `ray up`")
    return 1 if problems else 0


def run_firewall(ns: argparse.Namespace, compute: Callable[[str | None], GoogleCompute]) -> int:
    raw = cluster_yaml.load(ns.config)
    tag = ns.target_tag or preflight.head_target_tag(raw)
    if tag is None:
        raise PreflightError("the head node type has no network tag (node_config.tags.items); "
                             "add one, or pass --target-tag")
    wanted = preflight.firewall_rule(ns.name, ns.network, ns.port, ns.source_range, tag)
    api = compute(ns.project or raw["provider"].get("project_id"))
    existing = api.firewall(ns.name)
    if existing is None:
        api.insert_firewall(wanted)
        print(f"created firewall rule {ns.name}: tcp:{ns.port} from "
              f"{', '.join(wanted['sourceRanges'])} to VMs tagged {tag}")
        return 0
    patch = preflight.firewall_patch(existing, wanted)
    if not patch:
        print(f"firewall rule {ns.name} is up to date")
        return 0
    api.patch_firewall(ns.name, patch)
    print(f"updated firewall rule {ns.name}: {', '.join(sorted(patch))}")
    return 0


def main(argv: list[str] | None = None,
         compute: Callable[[str | None], GoogleCompute] = connect) -> int:
    """``compute`` turns a project id (or None) into the API client: tests pass one aimed at a
    loopback fake."""
    ns = parser().parse_args(argv)
    try:
        if ns.command == "check":
            return run_check(ns, compute)
        return run_firewall(ns, compute)
    except PreflightError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"error: {exc.filename}: no such file (run from the repository's top folder, "
              "or pass --config)", file=sys.stderr)
        return 1
