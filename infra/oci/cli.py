"""``python -m infra.oci``: preflight for `ray up infra/oci/ray_cluster.yaml`.

  check CLUSTER_YAML          every node type's shape is offered in the availability domain,
                              the subnet's security list lets in no more than it should, Ray's
                              token and an HTTPS license are in place to be copied to the nodes
  security-list CLUSTER_YAML  write the subnet's security list: the serving port to your
                              clients' CIDR, SSH to yours, everything else only inside the subnet
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from infra.oci import preflight
from infra.oci.clients import Backoff, OCIClients, OCIProviderConfig, build_clients


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m infra.oci", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="shapes, security list, token and license")
    check.add_argument("config", help="the cluster YAML, e.g. infra/oci/ray_cluster.yaml")
    sl = sub.add_parser("security-list", help="write the cluster subnet's security list")
    sl.add_argument("config", help="the cluster YAML (its provider names the security list)")
    sl.add_argument("--client-cidr", required=True,
                    help="the network your clients call from, e.g. 203.0.113.0/24")
    sl.add_argument("--admin-cidr", required=True,
                    help="where you run `ray up` and the dashboard tunnel, e.g. 198.51.100.7/32")
    sl.add_argument("--port", type=int, default=preflight.SERVING_PORT,
                    help=f"the serving port (default {preflight.SERVING_PORT})")
    sl.add_argument("--dry-run", action="store_true", help="print the rules, write nothing")
    return parser


def main(argv: list[str] | None = None,
         client_factory: Callable[[OCIProviderConfig], OCIClients] = build_clients,
         backoff: Backoff | None = None) -> int:
    import oci

    ns = build_parser().parse_args(argv)
    backoff = backoff or Backoff()
    with open(ns.config) as f:
        cluster = yaml.safe_load(f)
    try:
        cfg = OCIProviderConfig.from_provider(cluster["provider"])
    except ValueError as exc:
        print(f"{ns.config}: provider section: {exc}", file=sys.stderr)
        return 2
    try:
        clients = client_factory(cfg)
        if ns.command == "check":
            return _check(cluster, cfg, clients, backoff)
        return _security_list(ns, cfg, clients, backoff)
    except oci.exceptions.ConfigFileNotFound as exc:
        print(f"no OCI credentials: {exc}; run `oci setup config`", file=sys.stderr)
    except oci.exceptions.InvalidConfig as exc:
        print(f"OCI config {cfg.config_file} [{cfg.profile}] is incomplete: {exc}", file=sys.stderr)
    except oci.exceptions.ServiceError as exc:
        print(f"OCI refused {exc.operation_name or 'a call'}: {exc.status} {exc.code}: "
              f"{exc.message}", file=sys.stderr)
    return 2


def _check(cluster: dict[str, Any], cfg: OCIProviderConfig, clients: OCIClients,
           backoff: Backoff) -> int:
    problems: list[str] = []
    wanted = preflight.node_shapes(cluster)
    offered = preflight.shape_names(clients, cfg, backoff)
    missing = preflight.missing_shapes(wanted, offered)
    for node_type, shape in wanted.items():
        state = "NOT OFFERED" if node_type in missing else "ok"
        print(f"{node_type:<12} {shape:<22} {state} in {cfg.availability_domain}")
    problems += [f"{shape} ({node_type}) is not offered in {cfg.availability_domain}: pick "
                 "another availability domain or region, or ask OCI for the limit"
                 for node_type, shape in missing.items()]
    if cfg.security_list_id:
        cidr = preflight.subnet_cidr(clients, cfg.subnet_id, backoff)
        ingress, egress = preflight.read_security_list(clients, cfg.security_list_id, backoff)
        problems += [f"security list: {p}; run `python -m infra.oci security-list`"
                     for p in preflight.security_problems(ingress, egress, cidr)]
    else:
        problems.append("provider.security_list_id is not set: the subnet's rules are unchecked")
    mounts = cluster.get("file_mounts", {})
    token = Path(mounts.get(preflight.TOKEN_FILE, preflight.TOKEN_FILE)).expanduser()
    if not token.is_file() or not token.read_text().strip():
        problems.append(f"no Ray token at {token}: run `ray get-auth-token --generate`")
    problems += preflight.license_problems(
        Path(mounts.get(preflight.LICENSE_ENV_FILE, preflight.LICENSE_ENV_FILE)).expanduser())
    for problem in problems:
        print(f"problem: {problem}")
    print(f"{len(problems)} problem(s)" if problems else "ready for `ray up`")
    return 1 if problems else 0


def _security_list(ns: argparse.Namespace, cfg: OCIProviderConfig, clients: OCIClients,
                   backoff: Backoff) -> int:
    if not cfg.security_list_id:
        print("set provider.security_list_id in the cluster YAML", file=sys.stderr)
        return 2
    cidr = preflight.subnet_cidr(clients, cfg.subnet_id, backoff)
    try:
        ingress, egress = preflight.security_rules(cidr, ns.client_cidr, ns.admin_cidr, ns.port)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    for direction, rules in (("in", ingress), ("out", egress)):
        for rule in rules:
            where = rule.get("source") or rule.get("destination")
            print(f"{direction:<3} {where:<18} {rule['description']}")
    if ns.dry_run:
        return 0
    preflight.write_security_list(clients, cfg.security_list_id, ingress, egress, backoff)
    written = preflight.read_security_list(clients, cfg.security_list_id, backoff)
    problems = preflight.security_problems(*written, cidr, ns.port)
    for problem in problems:
        print(f"problem: {problem}")
    print(f"wrote {cfg.security_list_id}" if not problems else "the written list has problems")
    return 1 if problems else 0
