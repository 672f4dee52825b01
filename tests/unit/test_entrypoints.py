"""`serve run serve_app:app`, `serve run serve_app:build_app k=v`, `serve deploy <yaml>`:
each entry point builds a valid application graph (no cluster needed to bind one)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from serve_app import ray_internals

ROOT = Path(__file__).resolve().parents[2]
import_attr = ray_internals.symbol("import_attr")


def _deployments(app: Application) -> dict[str, object]:
    # The ingress is bound with the other LLM applications as its `handles` argument.
    ingress = app._bound_deployment
    config, handles = ingress.init_args
    llms = {name: h._bound_deployment for name, h in handles.items()}
    if config.colocate_ingress:
        llms = {config.models[0].name: ingress, **llms}
    return {"ingress": ingress, "config": config, "llms": llms, "handles": handles}


def test_serve_run_default_import_path():
    app = import_attr("serve_app:app")
    assert isinstance(app, Application)
    parts = _deployments(app)
    # Colocated: the model's own replicas serve HTTP, nothing sits behind a handle.
    assert parts["ingress"].name == "LLM:smollm2-135m-instruct"
    assert parts["handles"] == {}
    assert list(parts["llms"]) == ["smollm2-135m-instruct"]


def test_build_app_takes_cli_strings():
    build = import_attr("serve_app:build_app")
    app = build({"model": "builtin:smollm2-135m-instruct", "model_name": "m",
                 "api_keys": "k1,k2", "max_replicas": "2"})
    config = _deployments(app)["config"]
    assert [k.get_secret_value() for k in config.api_keys] == ["k1", "k2"]
    assert config.models[0].name == "m" and config.models[0].max_replicas == 2
    with pytest.raises(ValidationError):
        build({"not_a_setting": "1"})


def test_serve_config_yaml_is_valid_and_builds():
    raw = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(raw)
    (app_schema,) = schema.applications
    assert app_schema.import_path == "serve_app:build_app"
    assert schema.http_options.port == 9000
    app = import_attr(app_schema.import_path)(app_schema.args)
    parts = _deployments(app)
    assert [m.name for m in parts["config"].models] == ["smollm2-135m-instruct"]
    llm = parts["llms"]["smollm2-135m-instruct"]
    assert llm.ray_actor_options["num_cpus"] == 0


def test_serve_config_yaml_does_not_serve_every_interface_without_a_key():
    """As shipped: every interface, named keys in a store, /metrics behind a key; with no key
    created yet it is refused at start, as every ingress replica checks."""
    from serve_app.tenants import UnauthenticatedExposureError, check_exposure

    raw = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    config = _deployments(import_attr("serve_app:build_app")(raw["applications"][0]["args"]))[
        "config"]
    assert config.metrics_auth and config.key_store_path and not config.allow_unauthenticated
    with pytest.raises(UnauthenticatedExposureError):
        check_exposure([raw["http_options"]["host"]], len(config.api_keys),
                       config.allow_unauthenticated)


def test_layouts_bind_the_right_deployments():
    from serve_app.builder import build_app_from_config
    from serve_app.config import AppConfig, ModelConfig

    a = ModelConfig(name="a", device="gpu", max_ongoing_requests=8, max_queued_requests=4)
    b = ModelConfig(name="b", device="cpu")
    colocated = _deployments(build_app_from_config(
        AppConfig(models=(a, b), ingress_max_ongoing_requests=100)))
    ingress = colocated["ingress"]
    assert ingress.name == "LLM:a" and list(colocated["handles"]) == ["b"]
    assert ingress.ray_actor_options["num_gpus"] == 1  # the ingress is the GPU replica
    # Serve's own limit is for all HTTP traffic; the app admits max_ongoing + max_queued.
    assert ingress._deployment_config.max_ongoing_requests == 100
    assert ingress._deployment_config.max_queued_requests == -1
    assert colocated["llms"]["b"].name == "LLM:b"

    split = _deployments(build_app_from_config(
        AppConfig(models=(a, b), colocate_ingress=False)))
    assert split["ingress"].name == "Ingress"
    assert split["ingress"].ray_actor_options["num_cpus"] == 0
    assert "num_gpus" not in split["ingress"].ray_actor_options
    assert list(split["handles"]) == ["a", "b"]
    assert split["llms"]["a"]._deployment_config.max_ongoing_requests == 8


def test_colocated_layout_refuses_scale_to_zero():
    from serve_app.config import AppConfig, ModelConfig, Settings

    with pytest.raises(ValidationError, match="colocate_ingress"):
        AppConfig(models=(ModelConfig(min_replicas=0, max_replicas=2),))
    config = Settings(min_replicas="0", max_replicas="2",
                      colocate_ingress="false").to_app_config()
    assert config.models[0].min_replicas == 0 and not config.colocate_ingress


def test_replica_http_follows_settings_and_needs_the_colocated_layout():
    from serve_app.config import AppConfig, ModelConfig, Settings

    config = Settings(port="9123", host="0.0.0.0").to_app_config()
    assert (config.http_host, config.http_port) == ("0.0.0.0", 9123)
    assert Settings(replica_http="false").to_app_config().http_port is None
    assert Settings(colocate_ingress="false").to_app_config().http_port is None
    with pytest.raises(ValidationError, match="http_port"):
        AppConfig(models=(ModelConfig(),), colocate_ingress=False, http_port=9000)


def test_colocated_autoscaling_scales_on_what_the_replicas_report():
    from types import SimpleNamespace

    from ray.serve.config import AutoscalingConfig

    from serve_app.autoscaling import desired_replicas
    from serve_app.builder import colocated_options
    from serve_app.config import AppConfig, ModelConfig

    model = ModelConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=8)
    options = colocated_options(model, AppConfig(models=(model,)))
    auto = AutoscalingConfig(**options["autoscaling_config"])
    # Serve ships the policy cloudpickled: what it runs is a copy, named as ours and acting so.
    policy = auto.policy.get_policy()
    assert (policy.__module__, policy.__qualname__) == ("serve_app.autoscaling", "in_flight_policy")
    ctx = SimpleNamespace(aggregated_metrics={"in_flight": {"r1": 20.0, "r2": 4.0}},
                          config=auto, target_num_replicas=2)
    assert policy(ctx) == (3.0, {})  # 24 in flight / 8 per replica
    assert desired_replicas({}, 8, current_target=2) == 2  # nothing reported yet: hold
    assert desired_replicas({"r1": 0.0}, 8, current_target=2) == 0  # Serve clamps to min
    fixed = colocated_options(ModelConfig(), AppConfig())
    assert "autoscaling_config" not in fixed and fixed["num_replicas"] == 1


def test_the_cli_refuses_every_interface_without_a_key_before_starting_anything(tmp_path):
    """`python -m serve_app --host 0.0.0.0` with no key: refused at once, saying what to do,
    before Ray or the model start; with a key in the store it gets past the check."""
    import subprocess
    import sys

    env = {**os.environ, "SERVE_APP_KEY_STORE_PATH": str(tmp_path / "api_keys.db"),
           "SERVE_APP_DATA_DIR": str(tmp_path), "SERVE_APP_HOST": "0.0.0.0"}
    env.pop("SERVE_APP_API_KEYS", None)
    run = subprocess.run([sys.executable, "-m", "serve_app"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0
    assert "Refusing to serve on 0.0.0.0 without an API key" in run.stderr
    assert "keys create" in run.stderr and "Preparing model" not in run.stdout
