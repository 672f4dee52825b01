"""infra/oci/ray_cluster.yaml and its Serve config, rendered as `ray up` renders them, and what
keeps the cluster closed: token auth on every `ray start` and the token on every node, the
dashboard on loopback, Serve's switches and telemetry off as serve_app/config.py has them."""
from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from infra.oci import preflight
from infra.oci.node_provider import OCINodeConfig, OCINodeProvider
from serve_app.config import RAY_SERVE_ENV, TELEMETRY_OFF_ENV, Settings
from tests.infra import oci_ray

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "infra" / "oci" / "ray_cluster.yaml"
SERVE_CONFIG = ROOT / "infra" / "oci" / "serve_config.yaml"
_ASSIGNMENT = re.compile(r"^([A-Za-z_]\w*)=(.*)$", re.S)


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def rendered() -> dict:
    return oci_ray.render(load(CLUSTER_YAML))


def env_before(command: str, program: str) -> dict[str, str]:
    """Variables a shell command sets before it runs `program` (`export A=1 && ...`, `A=1 prog`)."""
    env: dict[str, str] = {}
    for word in shlex.split(command.replace("&&", " && ")):
        if word.endswith(program):
            return env
        match = _ASSIGNMENT.match(word)
        if match:
            env[match.group(1)] = match.group(2)
    raise AssertionError(f"no {program} in {command!r}")


def starts(config: dict, role: str) -> list[str]:
    return [c for c in config[f"{role}_start_ray_commands"] if "ray start" in c]


def test_ray_accepts_it_and_refuses_a_typo(rendered):
    assert rendered["provider"]["type"] == "external"
    assert rendered["head_setup_commands"] == rendered["setup_commands"]     # nothing added
    broken = load(CLUSTER_YAML)
    broken["idle_timeout_minute"] = 5
    with pytest.raises(jsonschema.ValidationError):
        oci_ray.render(broken)
    missing = load(CLUSTER_YAML)
    del missing["worker_setup_commands"]            # an external provider gets no defaults
    with pytest.raises(KeyError):
        oci_ray.render(missing)


def test_the_provider_accepts_every_node_type(rendered, tmp_path):
    (tmp_path / "key.pub").write_text("ssh-ed25519 AAAA me")
    config = copy.deepcopy(rendered)
    config["auth"]["ssh_private_key"] = str(tmp_path / "key")
    booted = OCINodeProvider.bootstrap_config(config)
    assert booted["provider"]["ssh_authorized_keys"] == "ssh-ed25519 AAAA me"
    head = OCINodeProvider(booted["provider"], "x").prepare_for_head_node(booted)
    assert head["provider"]["auth"] == "instance_principal"


def test_gpu_types_cover_the_oci_shapes_with_matching_resources(rendered):
    types = rendered["available_node_types"]
    shapes = preflight.node_shapes(rendered)
    assert {"VM.GPU.A10.1", "VM.GPU.A10.2", "BM.GPU.A100-v2.8", "BM.GPU.H100.8"} <= set(
        shapes.values())
    for name, node_type in types.items():
        node = OCINodeConfig(**node_type["node_config"])
        resources = node_type["resources"]
        if ".GPU." not in node.shape:
            assert "GPU" not in resources and name == rendered["head_node_type"]
            assert resources.get("serve_app_head") == 1
            assert node.assign_public_ip
            continue
        gpus = int(node.shape.rsplit(".", 1)[1])
        model = node.shape.split(".")[2].split("-")[0]          # A10, A100, H100
        assert resources["GPU"] == gpus, name
        assert resources[f"accelerator_type:{model}"] == 1, name
        assert not node.assign_public_ip, name
        assert node.image_id, name          # the GPU image, with NVIDIA's driver
        assert node_type["max_workers"] >= 1 and node_type["min_workers"] == 0


def test_every_ray_start_has_token_auth_and_the_switches(rendered):
    expected = {**RAY_SERVE_ENV, **TELEMETRY_OFF_ENV, "RAY_AUTH_MODE": "token"}
    for role in ("head", "worker"):
        (command,) = starts(rendered, role)
        env = env_before(command, "ray")
        assert {k: env.get(k) for k in expected} == expected, role
        # The license (SERVE_APP_LICENSE_*) comes from the env file, loaded before Ray starts.
        assert command.index(". ~/.serve_app/license.env") < command.index("ray start")
        for stop in (c for c in rendered[f"{role}_start_ray_commands"] if "ray stop" in c):
            assert env_before(stop, "ray")["RAY_AUTH_MODE"] == "token"


def test_the_token_reaches_every_node_and_the_dashboard_stays_on_loopback(rendered):
    mounts = rendered["file_mounts"]
    assert mounts["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert mounts["~/.serve_app/license.env"] == "~/.serve_app/license.env"
    assert "chmod 600 ~/.ray/auth_token ~/.serve_app/license.env" in rendered["setup_commands"]
    (head,) = starts(rendered, "head")
    assert "--dashboard-host=127.0.0.1" in shlex.split(head)
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in shlex.split(head)
    (worker,) = starts(rendered, "worker")
    assert "--address=$RAY_HEAD_IP:6379" in worker


def test_serve_config_fits_the_cluster(rendered):
    serve = load(SERVE_CONFIG)
    assert serve["http_options"]["port"] == preflight.SERVING_PORT
    (app,) = serve["applications"]
    assert app["import_path"] == "serve_app:build_app"
    assert "license" not in app["args"] and "models" not in app["args"]   # license from the env
    config = Settings(**app["args"]).to_app_config()
    model = config.models[0]
    assert model.device == "gpu"
    assert config.metrics_auth and config.key_store_path  # /metrics needs a key, keys are named
    resource = f"accelerator_type:{model.accelerator_type}"
    fits = [name for name, t in rendered["available_node_types"].items()
            if t["resources"].get(resource) and t["resources"]["GPU"] >= model.tensor_parallel_size]
    assert fits == ["gpu_a10_1", "gpu_a10_2"]
    assert app["runtime_env"]["env_vars"] == TELEMETRY_OFF_ENV
