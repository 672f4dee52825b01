"""The fence around vLLM's internals holds for the installed release, and the per-model
`vllm serve` options reach vLLM under vLLM's own names."""

from __future__ import annotations

import dataclasses
import json

import pytest
from pydantic import ValidationError
from starlette.testclient import TestClient

from serve_app.config import AppConfig, ModelConfig, Settings
from serve_app.ingress import build_ingress
from tests.conftest import require_vllm
from tests.fakes import FakeLLMHandle, FakeLLMServer

TOOLS = {"enable_auto_tool_choice": True, "tool_call_parser": "hermes",
         "reasoning_parser": "deepseek_r1", "chat_template": "{{ messages[0]['content'] }}",
         "served_model_name": ("smol", "tiny")}


def test_every_vllm_internal_the_app_relies_on_is_there():
    require_vllm()
    from serve_app import vllm_internals

    assert vllm_internals.missing() == []


def test_frontend_options_reach_vllms_namespace_under_its_names():
    require_vllm()
    from serve_app.vllm_internals import frontend_namespace, symbol

    AsyncEngineArgs = symbol("AsyncEngineArgs")

    model = ModelConfig(name="m", device="cpu", **TOOLS)
    kwargs = model.engine_args("/models/m")
    assert kwargs["served_model_name"] == ["m", "smol", "tiny"]
    assert kwargs["reasoning_parser"] == "deepseek_r1"
    # AsyncEngineArgs(**kwargs) would look the model up; its fields are what counts here.
    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    assert set(kwargs) <= fields
    args = frontend_namespace(kwargs, model.frontend_args())
    assert args.enable_auto_tool_choice is True
    assert args.tool_call_parser == "hermes"
    assert args.chat_template == TOOLS["chat_template"]
    assert args.reasoning_parser == "deepseek_r1"
    assert args.served_model_name == ["m", "smol", "tiny"]
    assert args.model == "/models/m"
    with pytest.raises(ValueError, match="not vLLM frontend options"):
        frontend_namespace(kwargs, {"tool_parser": "hermes"})


def test_defaults_leave_vllms_frontend_defaults():
    require_vllm()
    from serve_app.vllm_internals import symbol

    defaults = vars(symbol("FrontendArgs")())
    for name, value in ModelConfig(device="cpu").frontend_args().items():
        assert defaults[name] == value
    assert "reasoning_parser" not in ModelConfig(device="cpu").engine_args("/m")


def test_auto_tool_choice_needs_a_parser_as_in_vllm_serve():
    with pytest.raises(ValidationError, match="requires tool_call_parser"):
        ModelConfig(enable_auto_tool_choice=True)


def test_aliases_are_unique_across_models():
    with pytest.raises(ValidationError, match="unique"):
        AppConfig(models=(ModelConfig(name="a"), ModelConfig(name="b", served_model_name=("a",))))


def test_settings_take_the_options_from_the_environment(monkeypatch):
    monkeypatch.setenv("SERVE_APP_SERVED_MODEL_NAME", "smol, tiny")
    monkeypatch.setenv("SERVE_APP_TOOL_CALL_PARSER", "hermes")
    monkeypatch.setenv("SERVE_APP_ENABLE_AUTO_TOOL_CHOICE", "true")
    monkeypatch.setenv("SERVE_APP_REASONING_PARSER", "qwen3")
    monkeypatch.setenv("SERVE_APP_CHAT_TEMPLATE", "/templates/t.jinja")
    (model,) = Settings().to_app_config().models
    assert model.served_model_name == ("smol", "tiny")
    assert (model.tool_call_parser, model.enable_auto_tool_choice) == ("hermes", True)
    assert (model.reasoning_parser, model.chat_template) == ("qwen3", "/templates/t.jinja")


def test_the_ingress_routes_an_alias_to_its_model():
    servers = {"a": FakeLLMServer("a"), "b": FakeLLMServer("b")}
    config = AppConfig(models=(ModelConfig(name="a", device="cpu"),
                               ModelConfig(name="b", device="cpu", served_model_name=("bee",))))
    app = build_ingress(config, {k: FakeLLMHandle(v) for k, v in servers.items()})
    body = json.dumps({"model": "bee", "prompt": "x"}).encode()
    with TestClient(app) as client:
        assert client.post("/v1/completions", content=body).status_code == 200
        assert client.post("/v1/completions", json={"model": "c", "prompt": "x"}
                           ).status_code == 404
    # vLLM gets the body as sent: it answers to the alias itself (served_model_name).
    assert servers["b"].calls == [("openai", ("completions", body))]
    assert servers["a"].calls == []
