"""The real ``maritalk`` client against the app (uvicorn on a loopback port, the real
``LLMServer`` over a stand-in engine that records vLLM's ``SamplingParams`` it gets), at the
edges of every field of ``generate`` and ``generate_raw``: what MariTalk Local and vLLM accept is
served, only what vLLM cannot run is refused."""

from __future__ import annotations

import asyncio
import threading

import httpx
import maritalk
import pytest
import uvicorn

from serve_app.config import AppConfig, ModelConfig
from serve_app.deployments import LocalHandle
from serve_app.ingress import build_ingress
from serve_app.llm_server import LLMServer
from tests.conftest import free_port, require_vllm, wait_for
from tests.fakes import FakeEngineFactory, write_tiny_model

require_vllm()


@pytest.fixture(scope="module")
def engines():
    return FakeEngineFactory()


@pytest.fixture(scope="module")
def local(tmp_path_factory, engines):
    tiny = write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    model = ModelConfig(name="m", source=str(tiny), max_model_len=2048)
    server = LLMServer(model, str(tmp_path_factory.mktemp("cache")), engine_factory=engines)
    app = build_ingress(AppConfig(models=(model,)), {"m": LocalHandle(server)})
    port = free_port()
    http = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                         lifespan="on"))

    async def serve():
        await server.start()  # on the loop that serves the requests
        await http.serve()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/", timeout=1).json()["status"] == "idle",
             timeout=60, interval=0.05, what="the app under uvicorn")
    try:
        yield maritalk.MariTalkLocal(host="127.0.0.1", port=port)
    finally:
        http.should_exit = True
        thread.join(timeout=20)


@pytest.fixture
def sampled(engines):
    """The sampling parameters the engine got for the request that produced ``answer``."""

    def check(answer: dict) -> dict:
        assert "error" not in answer, answer
        assert answer["output"] and "The capital is Paris.".startswith(answer["output"])
        params = engines.engines[0].calls[-1].sampling_params
        return {"temperature": params.temperature, "top_p": params.top_p,
                "max_tokens": params.max_tokens, "seed": params.seed, "stop": params.stop}

    return check


def test_the_clients_defaults(local, sampled):
    for answer in (local.generate("Oi"), local.generate_raw("Oi")):
        assert sampled(answer) == {"temperature": 0.7, "top_p": 0.95, "max_tokens": 512,
                                   "seed": None, "stop": []}


@pytest.mark.parametrize("call", ["generate", "generate_raw"])
@pytest.mark.parametrize(("kwargs", "expected"), [
    # MariTalk Local's benchmark sends 3.0 for long answers; vLLM samples at 2 at most.
    ({"temperature": 3.0}, {"temperature": 2.0}),
    ({"temperature": 1e6}, {"temperature": 2.0}),
    ({"temperature": 2.0}, {"temperature": 2.0}),
    ({"temperature": 0.0}, {"temperature": 0.0, "top_p": 1.0}),
    ({"temperature": 1e-6}, {"temperature": 0.01}),  # vLLM raises tiny temperatures to 0.01
    ({"top_p": 1.0}, {"top_p": 1.0}),
    ({"top_p": 1e-9}, {"top_p": 1e-9}),
    ({"do_sample": False, "temperature": 3.0, "top_p": 0.1}, {"temperature": 0.0, "top_p": 1.0}),
    ({"max_tokens": 1}, {"max_tokens": 1}),
    ({"stop_sequences": ["\n", "", "Fim"]}, {"stop": ["\n", "Fim"]}),
    ({"stop_sequences": [f"s{i}" for i in range(64)]}, {"stop": [f"s{i}" for i in range(64)]}),
    ({"seed": 0}, {"seed": 0}),
    ({"seed": 2**63 - 1}, {"seed": 2**63 - 1}),
    ({"seed": -(2**63)}, {"seed": -(2**63)}),
    ({"seed": -1}, {"seed": None}),  # vLLM's "no seed"
])
def test_edge_values_are_served(local, sampled, call, kwargs, expected):
    first = "Oi" if call == "generate_raw" else [{"role": "system", "content": "Seja breve."},
                                                 {"role": "user", "content": "Oi"},
                                                 {"role": "assistant", "content": "Olá!"},
                                                 {"role": "user", "content": "Tudo bem?"}]
    got = sampled(getattr(local, call)(first, **kwargs))
    assert {k: got[k] for k in expected} == expected


@pytest.mark.parametrize("call", ["generate", "generate_raw"])
@pytest.mark.parametrize(("kwargs", "param"), [
    ({"temperature": -0.01}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"seed": 2**63}, None),  # past 64 bits: refused with the JSON
    ({"stop_sequences": "\n"}, "stop_sequences"),
])
def test_what_vllm_cannot_run_is_refused(local, call, kwargs, param):
    # The client returns the error JSON (it refuses NaN and infinities itself).
    answer = getattr(local, call)("Oi", **kwargs)
    err = answer["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param


def test_status(local):
    assert local.status() == {"status": "idle", "models": ["m"]}
