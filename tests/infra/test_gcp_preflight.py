"""`python -m infra.gcp` through the real google-cloud-compute client, against a loopback fake of
the Compute Engine API (tests/infra/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth.credentials import AnonymousCredentials

from infra import cluster_yaml
from infra.gcp import compute, preflight
from infra.gcp.cli import main
from tests.infra.test_cluster_yaml import GCP, SERVE_CONFIG, license_env

IMAGE_FAMILY = ("deeplearning-platform-release", "common-cu128-ubuntu-2204-nvidia-570")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A laptop's home with Ray's token and the license env file in place."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("0123456789abcdef")
    (tmp_path / ".serve_app").mkdir()
    (tmp_path / ".serve_app" / "license.env").write_text(license_env("https://lic.example.com"))
    return tmp_path


@pytest.fixture
def config(tmp_path, compute_api):
    """ray_cluster.yaml with the fake's project filled in."""
    raw = cluster_yaml.load(GCP)
    raw["provider"]["project_id"] = compute_api.project
    path = tmp_path / "ray_cluster.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def run(compute_api, capsys):
    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv), compute=lambda project: compute.GoogleCompute(
            project, AnonymousCredentials(), {"api_endpoint": compute_api.endpoint}))
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture
def l4_region(compute_api):
    compute_api.zones = {"us-central1-a": {"nvidia-l4": 8}, "us-central1-c": {"nvidia-l4": 8},
                         "us-central1-f": {"nvidia-tesla-a100": 16},
                         "europe-west4-a": {"nvidia-l4": 8}}
    compute_api.quotas = {"us-central1": {"NVIDIA_L4_GPUS": (8, 2), "CPUS": (72, 8)}}
    compute_api.families = {IMAGE_FAMILY: "common-cu128-ubuntu-2204-nvidia-570-v20261101"}
    return compute_api


def test_check_reports_zones_quota_and_the_image_to_pin(run, config, home, l4_region):
    code, out, err = run("check", "--config", str(config), "--accelerator", "L4")
    assert (code, err) == (0, "")
    assert "zones of us-central1 offering it: us-central1-a, us-central1-c\n" in out
    assert "quota NVIDIA_L4_GPUS in us-central1: 6 of 8 left; enough for 6 of max_workers 8" in out
    assert ("projects/deeplearning-platform-release/global/images/"
            "common-cu128-ubuntu-2204-nvidia-570-v20261101") in out
    assert out.rstrip().endswith("ready for `ray up`")
    paths = [(m, p, a) for m, p, a, _ in l4_region.requests]
    project = f"/compute/v1/projects/{l4_region.project}"
    assert ("GET", f"{project}/regions/us-central1", {}) in paths
    # Every page of the aggregated listing was read (one zone per page in the fake).
    pages = [a for m, p, a in paths if p == f"{project}/aggregated/acceleratorTypes"]
    assert [a.get("pageToken") for a in pages] == [None, "1", "2"]
    assert all(a["filter"] == 'name = "nvidia-l4"' for a in pages)
    assert l4_region.writes() == []


def test_check_of_a_zone_without_the_gpu_and_of_no_quota(run, config, home, l4_region):
    raw = yaml.safe_load(config.read_text())
    raw["provider"]["availability_zone"] = "us-central1-f"
    config.write_text(yaml.safe_dump(raw))
    l4_region.quotas["us-central1"]["NVIDIA_L4_GPUS"] = (4, 4)
    code, out, _ = run("check", "--config", str(config))
    assert code == 1
    assert "provider.availability_zone us-central1-f does not offer it" in out
    assert "0 of 4 left; one gpu_l4 node needs 1. Request more" in out
    assert "2 problem(s)" in out


def test_check_of_a_region_without_the_gpu(run, config, home, l4_region):
    l4_region.quotas["asia-south2"] = {}
    code, out, _ = run("check", "--config", str(config), "--region", "asia-south2",
                       "--accelerator", "H100")
    assert code == 1
    assert "nvidia-h100-80gb: no zone of asia-south2 offers it" in out
    assert "quota NVIDIA_H100_GPUS in asia-south2: 0 of 0 left" in out


def test_check_reports_local_files_before_any_api_call(run, config, home, l4_region):
    (home / ".ray" / "auth_token").unlink()
    (home / ".serve_app" / "license.env").write_text(license_env("http://lic.example.com"))
    code, out, _ = run("check", "--config", str(config))
    assert code == 1
    assert "run `ray get-auth-token --generate`" in out
    assert "is not HTTPS" in out


def test_unknown_accelerator_and_disabled_api(run, config, home, l4_region):
    code, _, err = run("check", "--config", str(config), "--accelerator", "T4")
    assert code == 1 and "offers A100, A100-40G, A100-80G, H100, L4" in err
    code, _, err = run("check", "--config", str(config), "--project", "someone-else")
    assert code == 1 and "project 'someone-else' refused the request" in err
    assert "gcloud services enable compute.googleapis.com" in err


def test_missing_credentials_say_what_to_do(config, home, capsys):
    code = main(["check", "--config", str(config)])
    assert code == 1
    assert "No Google Cloud credentials found. Run `gcloud auth application-default login`" in (
        capsys.readouterr().err)


def service_account_file(path: Path, project: str | None) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    info = {"type": "service_account", "client_email": "preflight@example.iam.gserviceaccount.com",
            "token_uri": "https://oauth2.example.invalid/token", "private_key_id": "1",
            "private_key": key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()).decode()}
    if project:
        info["project_id"] = project
    path.write_text(json.dumps(info))
    return path


def test_missing_project_says_where_to_set_it(tmp_path, monkeypatch):
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS",
                       str(service_account_file(tmp_path / "sa.json", project=None)))
    with pytest.raises(compute.PreflightError, match="No project: set provider.project_id"):
        compute.connect(None)
    assert compute.connect("given").project == "given"
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS",
                       str(service_account_file(tmp_path / "sa.json", project="from-key")))
    assert compute.connect(None).project == "from-key"


# -- the serving port's firewall rule -------------------------------------------------------------


def test_firewall_rule_is_created_then_left_alone_then_updated(run, config, compute_api):
    code, out, _ = run("firewall", "--config", str(config), "--source-range", "203.0.113.7/24")
    assert code == 0 and "created firewall rule serve-app-http" in out
    ((method, path, body),) = compute_api.writes()
    assert (method, path) == ("POST", f"/compute/v1/projects/{compute_api.project}/global/firewalls")
    assert body == {
        "name": "serve-app-http", "network": "global/networks/default", "direction": "INGRESS",
        "priority": 1000, "sourceRanges": ["203.0.113.0/24"],
        "allowed": [{"IPProtocol": "tcp", "ports": ["9000"]}], "targetTags": ["serve-app-http"],
        "description": "serve_app: the serving port, for the customer's clients only"}

    code, out, _ = run("firewall", "--config", str(config), "--source-range", "203.0.113.0/24")
    assert code == 0 and "is up to date" in out and len(compute_api.writes()) == 1

    code, out, _ = run("firewall", "--config", str(config), "--source-range", "198.51.100.0/24",
                       "--source-range", "203.0.113.0/24")
    assert code == 0 and "updated firewall rule serve-app-http: sourceRanges" in out
    method, path, body = compute_api.writes()[-1]
    assert (method, path.rsplit("/", 1)[1]) == ("PATCH", "serve-app-http")
    assert body == {"sourceRanges": ["198.51.100.0/24", "203.0.113.0/24"]}


@pytest.mark.parametrize("cidr, message", [
    ("0.0.0.0/0", "opens the port to the whole internet"),
    ("::/0", "opens the port to the whole internet"),
    ("example.com", "is not an address or CIDR range"),
])
def test_firewall_refuses_the_internet_and_nonsense(run, config, compute_api, cidr, message):
    code, _, err = run("firewall", "--config", str(config), "--source-range", cidr)
    assert code == 1 and message in err
    assert compute_api.requests == []


def test_firewall_failures_are_reported(run, config, compute_api):
    compute_api.operation_error = (409, "The resource is being used by another operation")
    code, _, err = run("firewall", "--config", str(config), "--source-range", "203.0.113.0/24")
    assert code == 1 and "The resource is being used by another operation" in err
    compute_api.operation_error = None
    compute_api.firewalls["serve-app-http"] = {
        "name": "serve-app-http", "network": "https://www.googleapis.com/compute/v1/projects/"
        f"{compute_api.project}/global/networks/other"}
    code, _, err = run("firewall", "--config", str(config), "--source-range", "203.0.113.0/24")
    assert code == 1 and "exists on another network" in err


def test_the_rule_opens_the_serving_port_on_the_head_only():
    raw = cluster_yaml.load(GCP)
    serve = yaml.safe_load(SERVE_CONFIG.read_text())
    assert serve["http_options"]["port"] == preflight.SERVING_PORT
    assert preflight.head_target_tag(raw) == preflight.FIREWALL_NAME
    workers = [t for name, t in raw["available_node_types"].items() if name != raw["head_node_type"]]
    assert workers and not any("tags" in t["node_config"] for t in workers)


def test_preemptible_workers_count_against_preemptible_quota():
    raw = cluster_yaml.load(GCP)
    raw["available_node_types"]["gpu_l4"]["node_config"]["scheduling"]["provisioningModel"] = "SPOT"
    (l4,) = preflight.pick(preflight.gpu_node_types(raw), "L4")
    assert l4.quota_metric == "PREEMPTIBLE_NVIDIA_L4_GPUS"
    a100 = preflight.pick(preflight.gpu_node_types(raw), "A100")
    assert [t.quota_metric for t in a100] == ["NVIDIA_A100_GPUS", "NVIDIA_A100_80GB_GPUS"]


def rule(name, ports, source="0.0.0.0/0", network="default", **kw):
    return {"name": name, "direction": "INGRESS", "sourceRanges": [source],
            "network": f"https://www.googleapis.com/compute/v1/projects/p/global/networks/{network}",
            "allowed": [{"IPProtocol": "tcp", **({"ports": ports} if ports else {})}], **kw}


def test_rules_that_open_ray_to_the_internet_are_found():
    rules = [
        rule("default-allow-ssh", ["22"]),
        rule("allow-ray", ["6379", "8265"]),
        rule("everything-from-the-office", None, source="203.0.113.0/24"),
        rule("other-network", None, network="lab"),
        rule("other-vms", ["8265"], targetTags=["bastion"]),
        rule("switched-off", None, disabled=True),
        rule("our-head-v6", ["8000-9000"], source="::/0", targetTags=["serve-app-http"]),
        {**rule("all-protocols", None), "allowed": [{"IPProtocol": "all"}]},
    ]
    problems = preflight.exposed_rules(rules, "default", {"serve-app-http"})
    assert problems == [
        "firewall rule allow-ray opens 6379 (Ray GCS), 8265 (Ray dashboard) to the whole "
        "internet: delete it or narrow its sourceRanges",
        "firewall rule our-head-v6 opens 8076 (Ray object manager), 8265 (Ray dashboard), 9000 "
        "(serving port) to the whole internet: delete it or narrow its sourceRanges",
        "firewall rule all-protocols opens 6379 (Ray GCS), 8076 (Ray object manager), 8265 (Ray "
        "dashboard), 9000 (serving port), 10001 (Ray client), 52365 (Ray dashboard agent) to the "
        "whole internet: delete it or narrow its sourceRanges"]


def test_check_lists_the_projects_rules(run, config, home, l4_region):
    l4_region.firewalls = {"allow-dashboard": rule("allow-dashboard", ["8265"])}
    code, out, _ = run("check", "--config", str(config))
    assert code == 1
    assert "problem: firewall rule allow-dashboard opens 8265 (Ray dashboard)" in out
    assert ("GET", f"/compute/v1/projects/{l4_region.project}/global/firewalls") in [
        (m, p) for m, p, _, _ in l4_region.requests]
