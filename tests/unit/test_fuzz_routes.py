"""Property-based fuzz of the four inference routes: the app over the real ``LLMServer`` and
vLLM's own OpenAI layer, with a stand-in engine (``tests.fakes.FakeEngine``)."""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from serve_app.config import AppConfig, ModelConfig
from serve_app.deployments import LocalHandle
from serve_app.ingress import build_ingress
from serve_app.llm_server import LLMServer
from tests.conftest import require_vllm
from tests.fakes import FakeEngineFactory, write_tiny_model
from tests.strategies import ROUTES, assert_error_shape, encode, fuzz_routes, valid_body

MODEL = "m"

# vLLM deprecates chat's `max_tokens` (OpenAI's clients still send it); it warns from its own
# request model, which this test's vLLM layer runs in process.
pytestmark = pytest.mark.filterwarnings(
    "ignore:max_tokens is deprecated in favor of the max_completion_tokens field"
    ":DeprecationWarning")


@pytest.fixture(scope="module")
def app_client(tmp_path_factory):
    require_vllm()
    tiny = write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    model = ModelConfig(name=MODEL, source=str(tiny), max_model_len=2048)
    server = LLMServer(model, str(tmp_path_factory.mktemp("cache")),
                       engine_factory=FakeEngineFactory())
    # In process, as the colocated layout calls its own replica.
    app = build_ingress(AppConfig(models=(model,)), {MODEL: LocalHandle(server)})
    with TestClient(app) as client:
        client.portal.call(server.start)  # on the app's event loop, where requests run
        yield client


def test_no_input_gets_a_5xx_and_the_app_still_serves(app_client):
    fuzz_routes(lambda path, raw: app_client.post(
        path, content=raw, headers={"content-type": "application/json"}), MODEL,
        max_examples=2000)
    for path in ROUTES:
        resp = app_client.post(path, content=encode(valid_body(path, MODEL), True))
        assert resp.status_code == 200, (path, resp.text)
    assert app_client.get("/").json()["status"] == "idle"  # no admission slot leaked


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"model": MODEL, "messages": True}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": 1e308}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": None}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [1]}, "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": True}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": {"a": 1}}, "prompt"),
])
def test_wrong_input_types_are_400_at_the_ingress(app_client, path, body, param):
    resp = app_client.post(path, json=body)
    assert resp.status_code == 400
    assert assert_error_shape(resp)["param"] == param


@pytest.mark.parametrize(("path", "body"), [
    # vLLM's models raise TypeError or their own validation error here, not ValidationError.
    ("/v1/completions", {"model": MODEL, "prompt": None}),
    ("/v1/completions", {"model": MODEL, "prompt": [None]}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{}]}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "temperature": 3.0}),
])
def test_what_vllm_refuses_is_400(app_client, path, body):
    resp = app_client.post(path, json=body)
    assert resp.status_code == 400, resp.text
    assert_error_shape(resp)


@pytest.mark.parametrize(("raw", "code"), [
    (b'{"prompt": "x", "temperature": NaN}', "invalid_json"),
    (b'{"prompt": "x", "temperature": -Infinity}', "invalid_json"),
    (b'{"prompt": "x", "temperature": 1e400}', "number_out_of_range"),
    (b'{"prompt": "x", "seed": 9223372036854775808}', "number_out_of_range"),
    (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "number_out_of_range"),
    (b'{"prompt": "\\ud800"}', "invalid_encoding"),
    (b'{"prompt": "\xed\xa0\x80"}', "invalid_encoding"),
    (b'{"prompt": "x", "a": ' + b"[" * 100 + b"]" * 100 + b"}", "invalid_json"),
    (b'{"prompt": "x", "a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "invalid_json"),
])
def test_json_no_route_can_serve_is_400(app_client, raw, code):
    for path in ROUTES:
        resp = app_client.post(path, content=raw)
        assert resp.status_code == 400, (path, resp.text)
        assert assert_error_shape(resp)["code"] == code


def test_control_characters_are_served_and_unknown_fields_refused(app_client):
    body = {"model": MODEL, "prompt": "a\x00b\x1b[31m\u202e", "max_tokens": 2}
    resp = app_client.post("/v1/completions", content=json.dumps(body).encode())
    assert resp.status_code == 200, resp.text
    for path in ROUTES:
        resp = app_client.post(path, json={**valid_body(path, MODEL), "not_a_field": 1})
        assert resp.status_code == 400, (path, resp.text)
        assert "not_a_field" in assert_error_shape(resp)["message"]
