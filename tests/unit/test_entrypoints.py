"""`serve run serve_app:app`, `serve run serve_app:build_app k=v`, `serve deploy <yaml>`:
each entry point builds a valid application graph (no cluster needed to bind one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve import Application
from ray.serve._private.utils import import_attr
from ray.serve.schema import ServeDeploySchema

ROOT = Path(__file__).resolve().parents[2]


def _deployments(app: Application) -> dict[str, object]:
    # The ingress is bound with the LLM applications as its `handles` argument.
    ingress = app._bound_deployment
    config, handles = ingress.init_args
    return {"ingress": ingress, "config": config, "llms": handles}


def test_serve_run_default_import_path():
    app = import_attr("serve_app:app")
    assert isinstance(app, Application)
    parts = _deployments(app)
    assert parts["ingress"].name == "Ingress"
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
    llm = parts["llms"]["smollm2-135m-instruct"]._bound_deployment
    assert llm.ray_actor_options["num_cpus"] == 0
