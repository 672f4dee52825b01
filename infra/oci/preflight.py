"""Checks before `ray up` on OCI, and the subnet's security list.

Pure functions (`missing_shapes`, `security_rules`, `security_problems`, `license_problems`)
plus two that talk to OCI through an `OCIClients` (`shape_names`, `write_security_list`).
"""
from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from infra.oci.clients import Backoff, OCIClients, OCIProviderConfig

SERVING_PORT = 9000     # MariTalk Local's; infra/oci/serve_config.yaml's http_options.port
SSH_PORT = 22           # `ray up`, `ray exec`, and `ray dashboard`'s tunnel
HTTPS_PORT = 443        # the license server, package indexes, OCI's APIs (instance principals)
TOKEN_FILE = "~/.ray/auth_token"
LICENSE_ENV_FILE = "~/.serve_app/license.env"
ANYWHERE = ("0.0.0.0/0", "::/0")


def node_shapes(cluster: dict[str, Any]) -> dict[str, str]:
    """Node type -> shape, from a cluster YAML."""
    return {name: t["node_config"]["shape"]
            for name, t in cluster["available_node_types"].items()}


def shape_names(clients: OCIClients, cfg: OCIProviderConfig, backoff: Backoff) -> set[str]:
    """Shapes the compartment can launch in the availability domain (List Shapes)."""
    shapes = backoff.list_all(clients.compute.list_shapes, cfg.compartment_id,
                              availability_domain=cfg.availability_domain)
    return {s.shape for s in shapes}


def missing_shapes(wanted: dict[str, str], offered: set[str]) -> dict[str, str]:
    return {node_type: shape for node_type, shape in wanted.items() if shape not in offered}


def _cidr(text: str, what: str) -> str:
    network = ipaddress.ip_network(text, strict=False)
    if str(network) in ANYWHERE:
        raise ValueError(f"{what} {text} is the whole internet: name your clients' network")
    return str(network)


def security_rules(subnet_cidr: str, client_cidr: str, admin_cidr: str,
                   port: int = SERVING_PORT) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The cluster subnet's whole security list, as (ingress, egress) rules in the SDK's field
    names. In: the serving port from the clients, SSH from the admin, anything from the subnet
    itself (Ray's nodes talk on many ports), path-MTU ICMP from both outside networks.
    Out: the subnet, and HTTPS anywhere (license server, packages, OCI's APIs); nothing else, so
    a license server or package index spoken to in clear is unreachable."""
    subnet = str(ipaddress.ip_network(subnet_cidr, strict=False))
    client = _cidr(client_cidr, "client CIDR")
    admin = _cidr(admin_cidr, "admin CIDR")
    tcp, icmp = "6", "1"

    def tcp_in(source: str, p: int, why: str) -> dict[str, Any]:
        return {"protocol": tcp, "source": source, "description": why,
                "tcp_options": {"destination_port_range": {"min": p, "max": p}}}

    ingress = [
        tcp_in(client, port, "serving port, clients"),
        tcp_in(admin, SSH_PORT, "SSH: ray up, ray exec, ray dashboard's tunnel"),
        {"protocol": "all", "source": subnet, "description": "Ray between the cluster's nodes"},
        *({"protocol": icmp, "source": c, "description": "path MTU discovery",
           "icmp_options": {"type": 3, "code": 4}} for c in dict.fromkeys((client, admin))),
    ]
    egress = [
        {"protocol": "all", "destination": subnet, "description": "Ray between the nodes"},
        {"protocol": tcp, "destination": "0.0.0.0/0", "description": "HTTPS only",
         "tcp_options": {"destination_port_range": {"min": HTTPS_PORT, "max": HTTPS_PORT}}},
    ]
    return ingress, egress


def _ports(rule: dict[str, Any]) -> tuple[int, int] | None:
    r = (rule.get("tcp_options") or rule.get("udp_options") or {}).get("destination_port_range")
    return (r["min"], r["max"]) if r else None


def security_problems(ingress: list[dict[str, Any]], egress: list[dict[str, Any]],
                      subnet_cidr: str, port: int = SERVING_PORT) -> list[str]:
    """What in a security list lets more in (or out) than `security_rules` would; empty if
    nothing. Rules are in the SDK's field names (`oci.util.to_dict` of its models)."""
    subnet = ipaddress.ip_network(subnet_cidr, strict=False)
    problems = []
    for rule in ingress:
        source = ipaddress.ip_network(rule["source"], strict=False)
        if source.version == subnet.version and source.subnet_of(subnet):
            continue
        if rule["protocol"] == "1":
            continue            # ICMP opens no port
        if str(source) in ANYWHERE:
            problems.append(f"ingress from the whole internet: {_show(rule)}")
        elif rule["protocol"] != "6" or _ports(rule) not in ((port, port), (SSH_PORT, SSH_PORT)):
            problems.append(f"ingress beyond the serving port and SSH: {_show(rule)}")
    for rule in egress:
        dest = ipaddress.ip_network(rule["destination"], strict=False)
        if dest.version == subnet.version and dest.subnet_of(subnet):
            continue
        if rule["protocol"] != "6" or _ports(rule) != (HTTPS_PORT, HTTPS_PORT):
            problems.append(f"egress beyond HTTPS: {_show(rule)}")
    return problems


def _show(rule: dict[str, Any]) -> str:
    where = rule.get("source") or rule.get("destination")
    return f"protocol {rule['protocol']} {where} ports {_ports(rule) or 'all'}"


def read_security_list(clients: OCIClients, security_list_id: str,
                       backoff: Backoff) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import oci

    sl = backoff.call(lambda: clients.network.get_security_list(security_list_id).data)
    return ([oci.util.to_dict(r) for r in sl.ingress_security_rules or []],
            [oci.util.to_dict(r) for r in sl.egress_security_rules or []])


def subnet_cidr(clients: OCIClients, subnet_id: str, backoff: Backoff) -> str:
    return backoff.call(lambda: clients.network.get_subnet(subnet_id).data).cidr_block


def write_security_list(clients: OCIClients, security_list_id: str,
                        ingress: list[dict[str, Any]], egress: list[dict[str, Any]],
                        backoff: Backoff) -> None:
    """Replace the list's rules (OCI has no per-rule update: the list is the unit)."""
    import oci

    m = oci.core.models

    def model(cls, rule: dict[str, Any]):
        rule = dict(rule)
        if "tcp_options" in rule:
            rule["tcp_options"] = m.TcpOptions(destination_port_range=m.PortRange(
                **rule["tcp_options"]["destination_port_range"]))
        if "icmp_options" in rule:
            rule["icmp_options"] = m.IcmpOptions(**rule["icmp_options"])
        return cls(**rule)

    details = m.UpdateSecurityListDetails(
        ingress_security_rules=[model(m.IngressSecurityRule, r) for r in ingress],
        egress_security_rules=[model(m.EgressSecurityRule, r) for r in egress])
    backoff.call(lambda: clients.network.update_security_list(security_list_id, details))


def license_problems(env_file: Path, now: float | None = None) -> list[str]:
    """The license env file the nodes load: present, both keys, a valid unexpired key naming an
    HTTPS license server (the checks every cluster config shares, ``infra.cluster_yaml``)."""
    from infra.cluster_yaml import license_problems as env_problems

    if not env_file.is_file():
        return [f"no {env_file}: write a SERVE_APP_LICENSE_KEY=... "
                "line into it (chmod 600)"]
    try:
        return [f"{env_file}: {problem}" for problem in env_problems(env_file.read_text(), now)]
    except ValueError as exc:  # a line that is not KEY=value
        return [f"{env_file}: {exc}"]
