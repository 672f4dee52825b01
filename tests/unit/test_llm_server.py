"""``LLMServer``'s request paths with a stand-in engine (``tests.fakes.FakeEngine``) under vLLM's
real OpenAI layer, config and tokenizer: OpenAI chat and completions, unary and streamed,
MariTalk's timings, errors, and the license check before anything loads. No Ray, no model."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil

import pytest

from license_contract import ModelIdentity, build_manifest
from license_server.signing import sign_identity, signer_of
from serve_app import vllm_internals
from serve_app.config import ModelConfig
from serve_app.licensing import LicenseConfig
from serve_app.llm_server import LLMServer
from tests.conftest import require_vllm
from tests.fakes import (
    VENDOR_KEY,
    FakeEngineFactory,
    FakeLicenseActor,
    Script,
    issue_key,
    write_tiny_model,
)

require_vllm()

# `max_completion_tokens`: vLLM warns (DeprecationWarning, an error here) on chat `max_tokens`.
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 16}
COMPLETION = {"model": "m", "prompt": "The capital of France is", "max_tokens": 16}


@pytest.fixture(scope="module")
def runner():
    """One event loop for the module: the server's objects live on it across tests."""
    with asyncio.Runner() as run:
        yield run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def model_config(tiny, **kwargs) -> ModelConfig:
    # Unpaced: one SSE event per output, so streams can be compared output by output.
    return ModelConfig(name="m", source=str(tiny), max_model_len=2048, stream_interval_ms=0,
                       **kwargs)


@pytest.fixture(scope="module")
def started(runner, tiny, tmp_path_factory):
    factory = FakeEngineFactory()
    server = LLMServer(model_config(tiny), str(tmp_path_factory.mktemp("cache")),
                       engine_factory=factory)
    runner.run(server.start())
    (engine,) = factory.engines
    return server, engine


@pytest.fixture
def server(started):
    server, engine = started
    engine.script = Script()
    engine.calls.clear()
    return server


@pytest.fixture
def engine(started):
    return started[1]


def call(runner, coro):
    return runner.run(coro)


def stream(runner, server, endpoint, body):
    async def collect():
        return [item async for item in server.openai_stream(endpoint, json.dumps(body).encode())]

    return runner.run(collect())


def events(items) -> list[str]:
    """The SSE ``data:`` payloads of a stream's items (the first item is ``(status, text)``)."""
    text = items[0][1] + "".join(items[1:])
    return [e[len("data: "):] for e in text.split("\n\n") if e]


# -- construction ----------------------------------------------------------------------------


def test_the_constructor_only_stores(tiny, tmp_path):
    factory = FakeEngineFactory()
    LLMServer(model_config(tiny), str(tmp_path), engine_factory=factory)
    assert factory.engines == []


def test_start_builds_the_engine_from_vllms_config_of_the_model(server, engine, tiny):
    assert engine.vllm_config.model_config.max_model_len == 2048
    assert engine.vllm_config.model_config.model == str(tiny.resolve())
    assert str(engine.vllm_config.model_config.dtype) == "torch.float32"  # CPU: float32


def test_ready_names_the_model(runner, server):
    assert call(runner, server.ready()) == "m"


# -- OpenAI ------------------------------------------------------------------------------------


def test_chat_unary(runner, server, engine):
    status, text = call(runner, server.openai("chat", json.dumps(CHAT).encode()))
    assert status == 200
    answer = json.loads(text)
    assert answer["object"] == "chat.completion" and answer["model"] == "m"
    assert answer["choices"][0]["message"]["content"] == "The capital is Paris."
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"]["completion_tokens"] == 5
    # vLLM's layer rendered the chat template and tokenized it: the engine got token ids.
    (got,) = engine.calls
    tokenizer = engine.get_tokenizer()
    assert got.prompt["prompt_token_ids"] == tokenizer.encode("user hi assistant",
                                                              add_special_tokens=False)
    assert got.sampling_params.max_tokens == 16


def test_completion_unary(runner, server, engine):
    status, text = call(runner, server.openai("completions", json.dumps(COMPLETION).encode()))
    assert status == 200
    answer = json.loads(text)
    assert answer["object"] == "text_completion"
    assert answer["choices"][0]["text"] == "The capital is Paris."
    assert answer["usage"]["prompt_tokens"] == len(engine.calls[0].prompt["prompt_token_ids"])


def test_chat_stream_one_event_per_output_then_done(runner, server, engine):
    items = stream(runner, server, "chat", {**CHAT, "stream": True})
    assert items[0][0] == 200 and isinstance(items[0], tuple)
    assert all(isinstance(i, str) for i in items[1:])
    data = events(items)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "The capital is Paris."
    # Role first, then one chunk per output (unpaced), the last one with the finish reason.
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")) == 5
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"


def test_completion_stream(runner, server):
    data = events(stream(runner, server, "completions", {**COMPLETION, "stream": True}))
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "The capital is Paris."
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_stream_and_unary_tell_vllm_the_output_kind(runner, server, engine):
    RequestOutputKind = vllm_internals.symbol("RequestOutputKind")

    call(runner, server.openai("completions", json.dumps(COMPLETION).encode()))
    stream(runner, server, "completions", {**COMPLETION, "stream": True})
    assert [c.sampling_params.output_kind for c in engine.calls] == [
        RequestOutputKind.FINAL_ONLY, RequestOutputKind.DELTA]


def test_coalesced_streams_carry_the_same_text(runner, server):
    """The router layout's replicas merge SSE events that are ready together."""
    plain = events(stream(runner, server, "completions", {**COMPLETION, "stream": True}))
    server._coalesce_streams = True
    try:
        merged = events(stream(runner, server, "completions", {**COMPLETION, "stream": True}))
    finally:
        server._coalesce_streams = LLMServer._coalesce_streams
    text = lambda data: "".join(json.loads(d)["choices"][0]["text"] for d in data[:-1])  # noqa: E731
    assert text(merged) == text(plain) and merged[-1] == "[DONE]"


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_a_bad_body_is_400_before_the_engine(runner, server, engine, endpoint):
    status, text = call(runner, server.openai(endpoint, b'{"model": "m", "max_tokens": "x"}'))
    assert status == 400
    assert json.loads(text)["error"]["type"] == "invalid_request_error"
    items = stream(runner, server, endpoint, {"model": "m", "max_tokens": "x", "stream": True})
    assert items[0][0] == 400 and len(items) == 1
    assert engine.calls == []


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_an_unknown_parameter_is_400_naming_it(runner, server, engine, endpoint):
    body = {**(CHAT if endpoint == "chat" else COMPLETION), "temprature": 0.2}
    status, text = call(runner, server.openai(endpoint, json.dumps(body).encode()))
    assert status == 400, text
    error = json.loads(text)["error"]
    assert (error["code"], error["param"]) == ("unknown_parameter", "temprature")
    assert engine.calls == []


def test_a_prompt_past_the_context_is_400(runner, server, engine):
    body = {**COMPLETION, "max_tokens": 4000}
    status, text = call(runner, server.openai("completions", json.dumps(body).encode()))
    assert status == 400, text
    assert json.loads(text)["error"]["type"] == "invalid_request_error"
    assert engine.calls == []


def test_an_engine_failure_is_a_logged_500(runner, server, engine, caplog):
    engine.script = Script(error=RuntimeError("engine core died"))
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        status, text = call(runner, server.openai("completions", json.dumps(COMPLETION).encode()))
    assert status == 500
    error = json.loads(text)["error"]
    assert set(error) >= {"message", "type", "code"} and error["type"] != "invalid_request_error"
    assert any(r.exc_info and "engine core died" in str(r.exc_info[1]) for r in caplog.records)


def test_an_engine_value_error_is_400_and_not_logged(runner, server, engine, caplog):
    engine.script = Script(error=ValueError("prompt too long for this engine"))
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        status, text = call(runner, server.openai("chat", json.dumps(CHAT).encode()))
    assert status == 400
    assert "prompt too long" in json.loads(text)["error"]["message"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_failure_mid_stream_ends_the_stream_with_an_error_event(runner, server, engine):
    engine.script = Script(error=RuntimeError("engine core died"), fail_after=2)
    items = stream(runner, server, "completions", {**COMPLETION, "stream": True})
    assert items[0][0] == 200  # the stream had started
    data = events(items)
    assert data[-1] == "[DONE]"
    assert "error" in json.loads(data[-2])
    assert "".join(json.loads(d)["choices"][0]["text"] for d in data[:-2]) == "The capital"


def test_maritalk_engine_failure_is_a_logged_500(runner, server, engine, caplog):
    engine.script = Script(error=RuntimeError("engine core died"))
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        status, _ = call(runner, server.maritalk("raw", json.dumps({"prompt": "Oi"}).encode()))
    assert status == 500
    assert any(r.exc_info for r in caplog.records)


# -- MariTalk ----------------------------------------------------------------------------------


def test_generate_reports_the_engines_timings(runner, server, engine):
    engine.script = Script(stamps=(100.0, 100.25, 100.75, 102.0))
    status, text = call(runner, server.maritalk("raw", json.dumps(
        {"prompt": "The capital of France is", "max_tokens": 8}).encode()))
    assert status == 200
    answer = json.loads(text)
    assert answer["output"] == "The capital is Paris."
    assert (answer["queue_time"], answer["prompt_time"], answer["generation_time"]) == (
        0.25, 0.5, 1.25)
    assert answer["prompt_tokens"] == 5  # one per word: this tokenizer adds no BOS
    assert answer["completion_tokens"] == 5 and answer["finish_reason"] == "stop"
    (got,) = engine.calls
    assert got.prompt == {"prompt_token_ids": engine.get_tokenizer().encode(
        "The capital of France is")}
    assert got.sampling_params.max_tokens == 8
    assert got.request_id.startswith("maritalk-")


def test_generate_without_engine_stats_counts_it_all_as_prompt(runner, server, engine):
    engine.script = Script(stamps=None)
    status, text = call(runner, server.maritalk("raw", json.dumps({"prompt": "Oi"}).encode()))
    answer = json.loads(text)
    assert status == 200 and answer["queue_time"] == 0 and answer["generation_time"] == 0
    assert answer["prompt_time"] >= 0


def test_chat_generate_applies_the_chat_template(runner, server, engine):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    status, text = call(runner, server.maritalk("chat", json.dumps(body).encode()))
    assert status == 200
    answer = json.loads(text)
    assert answer["output"] == "The capital is" and answer["completion_tokens"] == 3
    tokenizer = engine.get_tokenizer()
    assert engine.calls[0].prompt["prompt_token_ids"] == tokenizer.encode(
        "user hi assistant ", add_special_tokens=False)


@pytest.mark.parametrize(("kind", "body", "param"), [
    ("raw", {"prompt": "Oi", "max_tokens": 4000}, "prompt"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000}, "messages"),
])
def test_generate_past_the_context_is_400(runner, server, engine, kind, body, param):
    status, text = call(runner, server.maritalk(kind, json.dumps(body).encode()))
    assert status == 400
    error = json.loads(text)["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", param)
    assert engine.calls == []


def test_generate_refuses_what_vllm_cannot_sample(runner, server, engine):
    status, text = call(runner, server.maritalk("raw", json.dumps(
        {"prompt": "Oi", "top_p": 0}).encode()))
    assert status == 400 and json.loads(text)["error"]["param"] == "top_p"
    assert engine.calls == []


# -- health and numbers ------------------------------------------------------------------------


def test_health_follows_the_engine(runner, server, engine):
    call(runner, server.check_health())
    engine.healthy = False
    try:
        with pytest.raises(RuntimeError, match="engine dead"):
            call(runner, server.check_health())
    finally:
        engine.healthy = True


def test_metrics_report_the_unfinished_count(runner, server):
    text = call(runner, server.metrics_text())
    assert 'serve_app_engine_unfinished_requests{model_name="m"} 0' in text


# -- licensing ---------------------------------------------------------------------------------


def license_config(tmp_path) -> LicenseConfig:
    return LicenseConfig(key="MTL1.x.y", ledger_path=str(tmp_path / "l.db"))


def test_a_replica_registers_with_the_license_before_loading(runner, tiny, tmp_path):
    order: list[str] = []
    actor = FakeLicenseActor(order=order)
    factory = FakeEngineFactory(order=order)
    server = LLMServer(model_config(tiny), str(tmp_path), license_config(tmp_path),
                       engine_factory=factory, license_actor=lambda lic: actor)
    runner.run(server.start())
    try:
        assert order == ["register", "engine"]
        ((_, model, gpus),) = actor.registered
        assert (model, gpus) == ("m", 0.0)  # a CPU replica holds no GPU
    finally:
        server.__del__()
    assert actor.deregistered == [actor.registered[0][0]]
    assert factory.engines[0].stopped


def test_a_replica_the_license_refuses_never_loads(runner, tiny, tmp_path):
    actor = FakeLicenseActor(allow=False)
    factory = FakeEngineFactory()
    server = LLMServer(model_config(tiny), str(tmp_path), license_config(tmp_path),
                       engine_factory=factory, license_actor=lambda lic: actor)
    with pytest.raises(RuntimeError, match="Not starting this replica: the license allows"):
        runner.run(server.start())
    assert factory.engines == [] and len(actor.registered) == 1


def vendor_license(tmp_path, **fields) -> LicenseConfig:
    _, key = issue_key(VENDOR_KEY, **fields)
    return LicenseConfig(key=key, ledger_path=str(tmp_path / "l.db"))


def test_a_licensed_replica_registers_under_its_model_before_anything_is_fetched(runner,
                                                                                 tmp_path):
    """Served as "chat", registered as the model: a license that does not cover it refuses the
    replica before the license server is asked for the weights (its URL does not resolve)."""
    actor = FakeLicenseActor(allow=False)
    factory = FakeEngineFactory()
    config = ModelConfig(name="chat", source="licensed:sabia-2-small")
    server = LLMServer(config, str(tmp_path / "cache"), vendor_license(tmp_path),
                       engine_factory=factory, license_actor=lambda lic: actor)
    with pytest.raises(RuntimeError, match="Not starting this replica"):
        runner.run(server.start())
    ((_, model, _),) = actor.registered
    assert model == "sabia-2-small"
    assert not (tmp_path / "cache").exists() and factory.engines == []


def test_a_copied_cache_folder_registers_as_the_model_the_vendor_signed(runner, tiny, tmp_path):
    folder = tmp_path / "copied"
    shutil.copytree(tiny, folder)
    manifest = build_manifest(folder)
    (folder / ".complete").write_text(manifest.to_json())
    (folder / ".identity").write_text(sign_identity(ModelIdentity(
        model="sabia-2-small", manifest=json.loads(manifest.to_json()),
        signer=signer_of(VENDOR_KEY)), VENDOR_KEY))
    actor = FakeLicenseActor()
    server = LLMServer(model_config(folder), str(tmp_path), vendor_license(tmp_path),
                       engine_factory=FakeEngineFactory(), license_actor=lambda lic: actor)
    runner.run(server.start())
    try:
        ((_, model, _),) = actor.registered
        assert model == "sabia-2-small"  # served as "m"
    finally:
        server.__del__()


# -- as Serve runs it --------------------------------------------------------------------------


def construct(cls, runner, *args, **kwargs):
    """What Serve does with a deployment class whose constructor is async."""
    obj = cls.__new__(cls)
    runner.run(obj.__init__(*args, **kwargs))
    return obj


def test_serve_gets_a_replica_only_once_its_engine_is_up(runner, tiny, tmp_path):
    from serve_app.deployments import started

    factory = FakeEngineFactory()
    replica = construct(started(LLMServer), runner, model_config(tiny), str(tmp_path),
                        engine_factory=factory)
    assert len(factory.engines) == 1
    status, _ = runner.run(replica.openai("completions", json.dumps(COMPLETION).encode()))
    assert status == 200


def test_the_colocated_replica_serves_http_over_its_own_engine(runner, tiny, tmp_path):
    import httpx

    from serve_app.config import AppConfig
    from serve_app.deployments import colocated

    factory = FakeEngineFactory()
    config = AppConfig(models=(model_config(tiny),), model_cache_dir=str(tmp_path))
    replica = construct(colocated(LLMServer), runner, config, {}, engine_factory=factory)
    assert len(factory.engines) == 1

    async def ask():
        app = await replica.__serve_build_asgi_app__()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://replica") as client:
            chat = await client.post("/v1/chat/completions", json=CHAT)
            raw = await client.post("/generate", json={"prompt": "Oi", "max_tokens": 2})
            return chat, raw

    chat, raw = runner.run(ask())
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == "The capital is Paris."
    assert raw.status_code == 200 and raw.json()["output"] == "The capital"
    runner.run(replica.check_health())
    runner.run(replica.__del__())  # Serve awaits it when it stops the replica
    assert factory.engines[0].stopped
    # The garbage collector would call the async __del__ again, unawaited.
    replica.__class__ = type("Stopped", (), {})


def test_the_builder_hands_the_engine_factory_to_every_llm_deployment():
    from serve_app.builder import build_app_from_config
    from serve_app.config import AppConfig

    factory = FakeEngineFactory()
    models = (ModelConfig(name="a"), ModelConfig(name="b"))
    for colocate in (True, False):
        app = build_app_from_config(AppConfig(models=models, colocate_ingress=colocate),
                                    engine_factory=factory)
        front = app._bound_deployment
        behind = front.init_args[1]  # the handles
        assert set(behind) == ({"b"} if colocate else {"a", "b"})
        for handle in behind.values():
            assert handle._bound_deployment.init_kwargs == {"engine_factory": factory}
        assert front.init_kwargs == ({"engine_factory": factory} if colocate else {})
    plain = build_app_from_config(AppConfig(models=models))._bound_deployment
    assert plain.init_kwargs == {} and plain.init_args[1]["b"]._bound_deployment.init_kwargs == {}
