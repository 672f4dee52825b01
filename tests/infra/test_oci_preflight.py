"""`python -m infra.oci` through the real `oci` SDK against the loopback fake: shapes in the
availability domain, the security list it writes (and the one it finds), token and license."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from infra.oci import cli, preflight
from infra.oci.clients import Backoff, build_clients
from tests.fakes import VENDOR_KEY, issue_key
from tests.infra.oci_fake import SECURITY_LIST, provider_section

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "infra" / "oci" / "ray_cluster.yaml"
CLIENTS, ADMIN = "203.0.113.0/24", "198.51.100.7/32"


def license_env(path: Path, server_url: str) -> Path:
    vendor = VENDOR_KEY
    now = time.time()
    _, key = issue_key(vendor, license_id="lic-1", issued_at=now - 60, expires_at=now + 86400,
                       server_url=server_url)
    path.write_text(f"SERVE_APP_LICENSE_KEY={key}\n")
    return path


@pytest.fixture
def cluster_yaml(oci_key, tmp_path) -> Path:
    """The shipped YAML with our fake's compartment and key, and its files in tmp_path."""
    with open(CLUSTER_YAML) as f:
        config = yaml.safe_load(f)
    config["provider"] = {**config["provider"], **provider_section(
        oci_key.write_config(tmp_path), security_list_id=SECURITY_LIST)}
    (tmp_path / "auth_token").write_text("a-ray-token")
    config["file_mounts"]["~/.ray/auth_token"] = str(tmp_path / "auth_token")
    config["file_mounts"]["~/.serve_app/license.env"] = str(
        license_env(tmp_path / "license.env", "https://license.example.com"))
    path = tmp_path / "ray_cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(fake, *argv: str, sleeps: list[float] | None = None) -> int:
    return cli.main(list(argv), client_factory=lambda cfg: build_clients(
        cfg, service_endpoint=fake.url), backoff=Backoff(sleep=(sleeps if sleeps is not None
                                                                else []).append))


def test_security_list_then_check_is_ready(oci_fake, cluster_yaml, capsys):
    assert run(oci_fake, "security-list", str(cluster_yaml), "--client-cidr", CLIENTS,
               "--admin-cidr", ADMIN) == 0
    written = oci_fake.security_lists[SECURITY_LIST]
    ingress = {(r["source"], r["protocol"], (r.get("tcpOptions") or {}).get(
        "destinationPortRange", {}).get("min")) for r in written["ingressSecurityRules"]}
    assert ingress == {(CLIENTS, "6", 9000), (ADMIN, "6", 22), ("10.0.0.0/24", "all", None),
                       (CLIENTS, "1", None), (ADMIN, "1", None)}
    egress = {(r["destination"], r["protocol"], (r.get("tcpOptions") or {}).get(
        "destinationPortRange", {}).get("min")) for r in written["egressSecurityRules"]}
    assert egress == {("10.0.0.0/24", "all", None), ("0.0.0.0/0", "6", 443)}

    sleeps: list[float] = []
    oci_fake.fail("ListShapes", 429, "TooManyRequests")
    assert run(oci_fake, "check", str(cluster_yaml), sleeps=sleeps) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "BM.GPU.H100.8" in out and "ready for `ray up`" in out
    assert len(sleeps) == 1


def test_check_names_a_shape_the_availability_domain_lacks(oci_fake, cluster_yaml, capsys):
    run(oci_fake, "security-list", str(cluster_yaml), "--client-cidr", CLIENTS,
        "--admin-cidr", ADMIN)
    for shapes in oci_fake.shapes.values():
        shapes.remove("BM.GPU.H100.8")
    assert run(oci_fake, "check", str(cluster_yaml)) == 1
    out = capsys.readouterr().out
    assert "gpu_h100_8   BM.GPU.H100.8          NOT OFFERED" in out
    assert "problem: BM.GPU.H100.8 (gpu_h100_8) is not offered" in out
    assert "1 problem(s)" in out


def test_check_finds_a_wide_open_list_and_a_missing_token(oci_fake, cluster_yaml, capsys):
    (cluster_yaml.parent / "auth_token").unlink()
    assert run(oci_fake, "check", str(cluster_yaml)) == 1
    out = capsys.readouterr().out
    assert "security list: ingress from the whole internet: protocol all 0.0.0.0/0" in out
    assert "security list: egress beyond HTTPS: protocol all 0.0.0.0/0" in out
    assert "ray get-auth-token --generate" in out


def test_check_refuses_a_license_server_in_clear(oci_fake, cluster_yaml, capsys):
    license_env(cluster_yaml.parent / "license.env", "http://license.example.com")
    assert run(oci_fake, "check", str(cluster_yaml)) == 1
    assert "license server http://license.example.com is not HTTPS" in capsys.readouterr().out


def test_clear_errors_for_a_bad_domain_and_missing_credentials(oci_fake, cluster_yaml, tmp_path,
                                                               capsys):
    config = yaml.safe_load(cluster_yaml.read_text())
    config["provider"]["availability_domain"] = "Uocm:US-ASHBURN-AD-9"
    cluster_yaml.write_text(yaml.safe_dump(config))
    assert run(oci_fake, "check", str(cluster_yaml)) == 2
    assert "400 InvalidParameter: Invalid availabilityDomain" in capsys.readouterr().err

    config["provider"]["config_file"] = str(tmp_path / "nowhere" / "config")
    cluster_yaml.write_text(yaml.safe_dump(config))
    assert run(oci_fake, "check", str(cluster_yaml)) == 2
    assert "no OCI credentials" in capsys.readouterr().err

    config["provider"]["compartmnet_id"] = "typo"
    cluster_yaml.write_text(yaml.safe_dump(config))
    assert run(oci_fake, "check", str(cluster_yaml)) == 2
    assert "compartmnet_id" in capsys.readouterr().err


def test_security_list_refuses_the_whole_internet_and_dry_run_writes_nothing(oci_fake,
                                                                            cluster_yaml):
    before = dict(oci_fake.security_lists[SECURITY_LIST])
    assert run(oci_fake, "security-list", str(cluster_yaml), "--client-cidr", "0.0.0.0/0",
               "--admin-cidr", ADMIN) == 2
    assert run(oci_fake, "security-list", str(cluster_yaml), "--client-cidr", CLIENTS,
               "--admin-cidr", ADMIN, "--dry-run") == 0
    assert oci_fake.security_lists[SECURITY_LIST] == before
    assert "UpdateSecurityList" not in oci_fake.calls


@pytest.mark.parametrize(("rule", "problem"), [
    ({"protocol": "6", "source": CLIENTS,
      "tcp_options": {"destination_port_range": {"min": 8265, "max": 8265}}},
     "ingress beyond the serving port and SSH"),                        # the dashboard
    ({"protocol": "6", "source": "0.0.0.0/0",
      "tcp_options": {"destination_port_range": {"min": 22, "max": 22}}},
     "ingress from the whole internet"),
    ({"protocol": "6", "source": CLIENTS,
      "tcp_options": {"destination_port_range": {"min": 6379, "max": 9000}}},
     "ingress beyond the serving port and SSH"),                        # Ray's GCS in a range
    ({"protocol": "17", "source": CLIENTS}, "ingress beyond the serving port and SSH"),
])
def test_security_problems_catch_each_extra_opening(rule, problem):
    ingress, egress = preflight.security_rules("10.0.0.0/24", CLIENTS, ADMIN)
    assert preflight.security_problems(ingress, egress, "10.0.0.0/24") == []
    found = preflight.security_problems([*ingress, rule], egress, "10.0.0.0/24")
    assert len(found) == 1 and found[0].startswith(problem)


def test_security_problems_catch_plain_http_out():
    ingress, egress = preflight.security_rules("10.0.0.0/24", CLIENTS, ADMIN)
    http = {"protocol": "6", "destination": "0.0.0.0/0",
            "tcp_options": {"destination_port_range": {"min": 80, "max": 80}}}
    assert preflight.security_problems(ingress, [*egress, http], "10.0.0.0/24") == [
        "egress beyond HTTPS: protocol 6 0.0.0.0/0 ports (80, 80)"]
