"""Real clients against the real stack (Ray Serve + vLLM on CPU + SmolLM2)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from types import SimpleNamespace

import httpx
import maritalk
import openai
import pytest
from pydantic import SecretStr

from tests.conftest import wait_for
from tests.e2e.conftest import ALIAS, MODEL
from tests.e2e.privacy import assert_no_canary_reaches_the_license_server
from tests.strategies import ROUTES, fuzz_routes, valid_body

pytestmark = pytest.mark.e2e

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)


def test_openai_chat(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], temperature=0,
        max_tokens=30,
    )
    choice = resp.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    assert resp.model == MODEL
    assert resp.usage.prompt_tokens > 5
    assert 0 < resp.usage.completion_tokens <= 30
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_openai_chat_stream_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], temperature=0,
        max_tokens=30, stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens >= 5
    # Streamed, not one blob; tokens that arrive within one stream interval share a chunk.
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert 1 < len(content) <= usage.completion_tokens


def test_sse_framing(stack):
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{stack.url}/v1/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
    assert "Paris" in text


def test_a_paced_stream_carries_exactly_the_whole_answer(stack):
    # Tokens merged between paced reads (streaming.PacedEngine) must add up to the same text.
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0,
            "ignore_eos": True}
    whole = httpx.post(f"{stack.url}/v1/completions", json=body, timeout=60).json()
    streamed = []
    with httpx.stream("POST", f"{stack.url}/v1/completions", timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}
                      ) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                streamed.append(json.loads(line[6:]))
    text = "".join(e["choices"][0]["text"] for e in streamed if e["choices"])
    assert text == whole["choices"][0]["text"]
    assert streamed[-1]["usage"]["completion_tokens"] == 40
    assert [e["choices"][0]["finish_reason"] for e in streamed if e["choices"]][-1] == "length"


def stream_events(stack, max_tokens: int = 40) -> tuple[list[dict], str]:
    """The JSON events of a greedy completion stream of ``max_tokens`` tokens, and its text."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    events = []
    with httpx.stream("POST", f"{stack.url}/v1/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    content = [e for e in events if e["choices"]]
    assert events[-1]["usage"]["completion_tokens"] == max_tokens
    return content, "".join(e["choices"][0]["text"] for e in content)


def test_pacing_is_wired_into_vllms_openai_layer(stack):
    """stream_interval_ms reaches the OpenAI layer (streaming.PacedEngine): at 0 each of 40
    tokens is its own SSE event, as in `vllm serve`; paced, tokens produced within one
    interval share an event and the text is the same. SmolLM2 on a 2-core CPU makes a token
    every ~50-70 ms, slower than the default 20 ms, so the paced run uses 1 s to be sure to
    merge on any machine."""
    original = stack.config

    def with_interval(ms: float):
        model = original.models[0].model_copy(update={"stream_interval_ms": ms})
        return original.model_copy(update={"models": (model, *original.models[1:])})

    try:
        stack.redeploy(with_interval(0))
        each, text = stream_events(stack)
        assert len(each) == 40
        stack.redeploy(with_interval(1000))
        merged, paced_text = stream_events(stack)
        assert 2 <= len(merged) < 40
        assert paced_text == text
    finally:
        stack.redeploy(original)


def test_each_ray_switch_took_effect(stack):
    """The private switches (ray_internals.RAY_SERVE_ENV) as Ray's processes see them: Serve's
    constants read back in a Ray worker, the raylet's from its environment, and the niceness
    of the workers, the Serve controller and the replica."""
    import os

    import psutil
    import ray

    from serve_app.ray_internals import (
        RAY_SERVE_ENV,
        RAYLET_SWITCHES,
        SERVE_CONSTANTS,
        as_switch_value,
        serve_switches,
    )

    @ray.remote(num_cpus=0)
    def read_back():
        return serve_switches(), os.getpriority(os.PRIO_PROCESS, 0)

    switches, niceness = ray.get(read_back.remote(), timeout=120)
    # The fixture sets RAY_SERVE_ENV unless the environment already chose (as `make serve`).
    started = {env: os.environ[env] for env in RAY_SERVE_ENV}
    for env in SERVE_CONSTANTS:
        assert switches[env] == as_switch_value(started[env], switches[env]), env
    processes = psutil.Process().children(recursive=True)
    (raylet,) = [p for p in processes if p.name() == "raylet"]
    for env in RAYLET_SWITCHES:
        assert raylet.environ().get(env) == started[env], env
    nice = int(started["RAY_worker_niceness"])
    assert niceness == nice
    titles = {p: " ".join(p.cmdline()) for p in processes if p.is_running()}
    serve_actors = [p for p, t in titles.items()
                    if t.startswith(("ray::ServeController", "ray::ServeReplica"))]
    assert len(serve_actors) >= 2
    assert all(p.nice() == nice for p in serve_actors)


# `strict`: the arguments follow the schema (OpenAI's meaning; vLLM pins them by grammar).
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.", "strict": True,
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]}},
    "additionalProperties": False}}}


@pytest.mark.parametrize("tool_choice", [
    "required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_real_tool_call(client, tool_choice):
    """tool_call_parser reaches vLLM's layer: a forced tool call. vLLM constrains the output
    to the parser's tool-call format and a strict tool's schema, so even a tiny model calls
    it correctly."""
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER], tool_choice=tool_choice, parallel_tool_calls=False, temperature=0,
        max_tokens=100)
    (call,) = resp.choices[0].message.tool_calls
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "London", "Tokyo")


def test_auto_tool_choice_is_accepted(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER],
        tool_choice="auto", temperature=0, max_tokens=30)
    assert resp.choices[0].finish_reason in ("stop", "tool_calls", "length")


def test_an_alias_reaches_the_model(client):
    resp = client.completions.create(model=ALIAS, prompt="The capital of France is",
                                     max_tokens=5, temperature=0)
    assert "Paris" in resp.choices[0].text
    assert resp.model == MODEL  # responses carry the model's name, as vLLM's first name


def test_openai_completions_and_sampling_params(client):
    resp = client.completions.create(model=MODEL, prompt="The capital of France is",
                                     max_tokens=5, temperature=0)
    assert "Paris" in resp.choices[0].text
    many = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12,
                                     n=3, temperature=1.0, seed=7)
    assert len(many.choices) == 3
    again = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12,
                                      n=3, temperature=1.0, seed=7)
    assert [c.text for c in many.choices] == [c.text for c in again.choices]
    stopped = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=30,
                                        temperature=0, stop=["7"])
    assert "7" not in stopped.choices[0].text
    assert stopped.choices[0].finish_reason == "stop"


def test_openai_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_maritalk_client(stack):
    port = int(stack.url.rsplit(":", 1)[1])
    local = maritalk.MariTalkLocal(host="127.0.0.1", port=port)
    assert local.status()["status"] in ("idle", "busy")
    answer = local.generate(QUESTION, do_sample=False, max_tokens=30)
    assert "Paris" in answer["output"]
    assert answer["prompt_time"] > 0
    assert answer["generation_time"] > 0
    assert answer["queue_time"] >= 0
    raw = local.generate_raw("The capital of France is", do_sample=False, max_tokens=5)
    assert "Paris" in raw["output"]
    stopped = local.generate_raw("1, 2, 3, 4,", do_sample=False, max_tokens=30,
                                 stop_sequences=["7"])
    assert "7" not in stopped["output"]


BAD_INPUTS = [
    ("/v1/chat/completions", b"{not json", 400),
    ("/v1/chat/completions", b"\xff\xfe\xfd", 400),
    ("/v1/chat/completions", b"[]", 400),
    ("/v1/chat/completions", json.dumps({"messages": "hi"}).encode(), 400),
    ("/v1/chat/completions", json.dumps({"model": MODEL}).encode(), 400),
    ("/v1/chat/completions", json.dumps({"model": "nope", "messages": []}).encode(), 404),
    ("/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(), 400),
    ("/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).encode(), 400),
    ("/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}).encode(), 400),
    ("/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "x"}], "n": 10**6}).encode(), 400),
    ("/v1/completions", json.dumps({"prompt": "hello " * 4000, "max_tokens": 5}).encode(), 400),
    ("/v1/completions", json.dumps(
        {"prompt": "hello " * 4000, "max_tokens": 5, "stream": True}).encode(), 400),
    ("/v1/completions", json.dumps({"prompt": 12.5}).encode(), 400),
    ("/v1/completions", b"x" * (2 << 20), 413),
    ("/generate", json.dumps({"prompt": "hello " * 4000}).encode(), 400),
    ("/generate", json.dumps({"prompt": "x", "max_tokens": -1}).encode(), 400),
    ("/generate", json.dumps({"prompt": "x", "temperature": "warm"}).encode(), 400),
    ("/chat/generate", json.dumps({"messages": [{"role": "bot", "content": "x"}]}).encode(), 400),
    ("/chat/generate", json.dumps({"messages": []}).encode(), 400),
    # Wrong JSON types that vLLM's request models raise on with more than a ValidationError.
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": True}).encode(), 400),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": 1e308}).encode(), 400),
    ("/v1/completions", json.dumps({"prompt": None}).encode(), 400),
    ("/v1/completions", b"{}", 400),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400),
    ("/v1/completions", b'{"prompt": "x", "seed": 99999999999999999999}', 400),
    ("/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "x"}], "temperature": 3.0}).encode(), 400),
]


@pytest.mark.parametrize(("path", "raw", "status"), BAD_INPUTS)
def test_bad_input_is_a_clean_4xx_and_the_next_request_works(stack, path, raw, status):
    resp = httpx.post(f"{stack.url}{path}", content=raw, timeout=60)
    assert resp.status_code == status, resp.text[:500]
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    good = httpx.post(f"{stack.url}/generate",
                      json={"prompt": "The capital of France is", "do_sample": False,
                            "max_tokens": 4}, timeout=60)
    assert good.status_code == 200 and "Paris" in good.json()["output"]


def test_context_overflow_says_so(stack):
    resp = httpx.post(f"{stack.url}/v1/completions",
                      json={"prompt": "hello " * 4000, "max_tokens": 5}, timeout=60)
    assert resp.json()["error"]["code"] == "context_length_exceeded"


def test_client_disconnect_aborts_the_vllm_request(stack):
    assert stack.unfinished() == 0
    body = {"model": MODEL, "prompt": "Tell me a very long story.", "max_tokens": 1500,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{stack.url}/v1/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert stack.unfinished() == 1  # the request is running in the engine
    # Leaving the block closed the connection mid-stream.
    wait_for(lambda: stack.unfinished() == 0, timeout=20, what="the engine to abort")


def test_overload_is_503_with_retry_after_and_bounded(stack):
    body = {"model": MODEL, "prompt": "Count to one hundred:", "max_tokens": 120,
            "ignore_eos": True}

    def call(_):
        r = httpx.post(f"{stack.url}/v1/completions", json=body, timeout=300)
        return r.status_code, r.headers.get("retry-after"), r.json()

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(call, range(24)))
    statuses = [s for s, _, _ in results]
    assert statuses.count(200) >= 4
    rejected = [(ra, j) for s, ra, j in results if s == 503]
    assert rejected, statuses
    assert all(ra == "1" and j["error"]["code"] == "overloaded" for ra, j in rejected)
    assert set(statuses) <= {200, 503}
    wait_for(lambda: stack.unfinished() == 0, timeout=30, what="the engine to drain")
    good = httpx.post(f"{stack.url}/v1/completions", json={**body, "max_tokens": 3}, timeout=60)
    assert good.status_code == 200


def test_metrics_and_health(stack):
    assert httpx.get(f"{stack.url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{stack.url}/metrics").text
    assert "serve_app_requests_total" in text
    assert "vllm:num_requests_running" in text
    assert "vllm:generation_tokens_total" in text


def test_the_engine_core_runs_the_model_worker_itself(stack):
    """On CPU with one worker vLLM's engine core runs it (affinity.single_worker): no separate
    worker process busy-waiting beside it, and the engine core has the OpenMP threads and core
    binding vLLM gives a worker process (not the one thread Ray sets for its workers)."""
    import psutil

    def title(process: psutil.Process) -> str:
        try:
            return " ".join(process.cmdline())
        except psutil.Error:  # ended meanwhile
            return ""

    processes = {p: title(p) for p in psutil.Process().children(recursive=True)}
    engines = [p for p, t in processes.items() if t.startswith("VLLM::EngineCore")]
    assert len(engines) == 1, processes.values()
    assert not any(t.startswith("VLLM::Worker") for t in processes.values())
    env = engines[0].environ()
    bound = env["GOMP_CPU_AFFINITY"].split()
    assert bound and int(env["OMP_NUM_THREADS"]) == len(bound)


def test_license_status_route(stack):
    status = httpx.get(f"{stack.url}/license", timeout=10).json()
    assert status["state"] == "ok" and status["customer"] == "ACME"
    assert status["instances_now"] == 1
    assert status["license_id"].startswith("lic_")


def test_licensed_model_is_served_under_its_name_and_billed_under_its_license(stack, client):
    """The vendor's flow: a license naming only the model, licensed:<model> served as <model>,
    its weights the ones the vendor signed, its usage billed under that license."""
    from license_contract import verify_identity, verify_key

    server = stack.license_server
    lic = verify_key(stack.config.license.key.get_secret_value())
    assert lic.models == (MODEL,)
    (model,) = stack.config.models
    assert (model.source, model.name) == (f"licensed:{MODEL}", MODEL)
    assert [m.id for m in client.models.list().data] == [MODEL]
    kept = (stack.data / "models" / "licensed" / MODEL / ".identity").read_text()
    identity, files = verify_identity(kept, signers=frozenset({server.service.public_key}))
    assert identity.model == MODEL and {f.name for f in files.files} >= {"config.json"}
    answer = client.chat.completions.create(model=ALIAS, max_tokens=8, temperature=0,
                                            messages=[{"role": "user", "content": QUESTION}])
    assert "Paris" in answer.choices[0].message.content and answer.model == MODEL
    assert httpx.get(f"{stack.url}/license", timeout=10).json()["license_id"] == lic.license_id
    totals = stack.flush_usage()
    assert totals["pending_seconds"] == 0 and totals["instance_seconds"] > 0
    billed = server.service.store.total_instance_seconds(lic.license_id)
    assert billed == pytest.approx(totals["instance_seconds"])


class InProcessActor:
    """A real ``LicenseActor`` in this process, called as an ``InstanceReporter`` calls the Ray
    actor (awaitable ``.remote``s)."""

    def __init__(self, actor) -> None:
        self.register = SimpleNamespace(remote=actor.register)
        self.heartbeat = SimpleNamespace(remote=actor.heartbeat)
        self.deregister = SimpleNamespace(remote=lambda instance_id: None)  # none registered


def test_licensed_weights_under_a_license_for_another_model_are_refused_before_download(
        stack, tmp_path):
    """The replica's start path in this process, against the stack's license server and
    bucket, under a license that covers another model: refused at registration before the
    server is asked; and a replica that skipped that check is refused by the server, with its
    reason, before any URL is handed out. Not a byte of the weights reaches the cache."""
    from serve_app.licensing import LicenseActor
    from serve_app.llm_server import LLMServer
    from serve_app.weights import WeightsError, resolve_model

    server = stack.license_server
    _, key = server.issue(models=("sabia-2-small",))
    other = server.license_config(key, tmp_path / "ledger.db")
    cache = tmp_path / "models"

    def downloads() -> int:
        return sum(1 for chunk in server.received if chunk.startswith(b"/v1/models/"))

    asked = downloads()
    actor = InProcessActor(LicenseActor(other, autostart=False))
    replica = LLMServer(stack.config.models[0], str(cache), other, license_actor=lambda _: actor,
                        engine_factory=lambda *_: pytest.fail("the engine must not start"))
    with pytest.raises(RuntimeError, match=f"does not cover model '{MODEL}'"):
        asyncio.run(replica.start())
    assert downloads() == asked
    with pytest.raises(WeightsError, match=f"refused model '{MODEL}'.*403: model_not_licensed"):
        resolve_model(f"licensed:{MODEL}", cache, license=other)
    assert downloads() == asked + 1
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_privacy_canary_never_reaches_the_license_server(stack):
    """Prompts and outputs stay on the customer's machines: only usage time is reported."""
    assert_no_canary_reaches_the_license_server(stack)


@pytest.mark.parametrize("api", ["openai", "maritalk"])
def test_bench_cli_runs_against_the_stack(stack, tmp_path, api):
    import subprocess
    import sys

    out = tmp_path / api
    run = subprocess.run(
        [sys.executable, "-m", "serve_app.bench", "--url", stack.url, "--api", api,
         "--concurrency", "1,2", "--n-repeats", "2", "--prompt-size", "40", "--max-tokens", "8",
         "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    text = run.stdout
    assert "generated_tps" in text and "total_tps" in text and "System tokens" in text
    assert "random prefix" in text and "failed" not in text
    data = json.loads((out / "results.json").read_text())
    ok = [r for r in data["requests"] if r["error"] is None]
    assert len(ok) == 2 * 1 + 2 * 2
    # OpenAI requests ignore EOS, so they generate exactly max_tokens; MariTalk's may stop early.
    expected = range(8, 9) if api == "openai" else range(1, 9)
    assert all(r["generated_tokens"] in expected and 35 <= r["prompt_tokens"] <= 45 for r in ok)
    assert all(r["decode_time"] >= 0 and r["wall"] >= r["ttft"] > 0 for r in ok)
    assert (out / "results.png").stat().st_size > 1000


def test_maritalk_client_at_temperature_3(stack):
    """MariTalk Local's benchmark tool samples at temperature 3.0 on purpose."""
    port = int(stack.url.rsplit(":", 1)[1])
    local = maritalk.MariTalkLocal(host="127.0.0.1", port=port)
    chat = local.generate(QUESTION, temperature=3.0, max_tokens=8, seed=1)
    raw = local.generate_raw("Once upon a time", temperature=3.0, top_p=1.0, max_tokens=8)
    for answer in (chat, raw):
        assert "error" not in answer, answer
        assert isinstance(answer["output"], str) and 1 <= answer["completion_tokens"] <= 8
        assert answer["generation_time"] >= 0


def test_request_ids_cross_the_real_stack(stack):
    resp = httpx.post(f"{stack.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                      headers={"X-Request-Id": "e2e-trace-1"}, timeout=60)
    assert resp.status_code == 200 and resp.headers["x-request-id"] == "e2e-trace-1"
    bad = httpx.post(f"{stack.url}/v1/completions", json={"prompt": None}, timeout=60)
    assert bad.status_code == 400 and len(bad.headers["x-request-id"]) == 32


def test_fuzzed_bodies_never_get_a_5xx_and_the_stack_still_serves(stack):
    # Valid bodies stay cheap (two tokens, no n): the cases are about input, not load.
    with httpx.Client(base_url=stack.url, timeout=120) as http:

        fuzz_routes(lambda path, raw: http.post(
            path, content=raw, headers={"content-type": "application/json"}), MODEL,
            max_examples=300, keep_cheap=True)
        for path in ROUTES:
            resp = http.post(path, json=valid_body(path, MODEL))
            assert resp.status_code == 200, (path, resp.text)
    wait_for(lambda: stack.unfinished() == 0, timeout=30, what="the engine to drain")


def test_auth_on_every_route(stack):
    """Redeploys the ingress with keys (the vLLM replica is kept), then without them again."""
    original = stack.config
    keyed = original.model_copy(update={"api_keys": (SecretStr("sk-test-1"),)})
    stack.redeploy(keyed)
    try:
        _check_auth(stack)
    finally:
        stack.redeploy(original)
        wait_for(lambda: httpx.get(f"{stack.url}/v1/models").status_code == 200, timeout=120,
                 what="the ingress without keys")


def _check_auth(stack):
    wait_for(lambda: httpx.get(f"{stack.url}/v1/models").status_code == 401, timeout=120,
             what="the keyed ingress")
    routes = [
        ("GET", "/license", None),
        ("GET", "/metrics", None),  # metrics_auth is on unless turned off
        ("GET", "/v1/models", None),
        ("GET", f"/v1/models/{MODEL}", None),
        ("POST", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 3}),
        ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 3}),
        ("POST", "/generate", {"prompt": "Hi", "max_tokens": 3}),
        ("POST", "/chat/generate", {"messages": [{"role": "user", "content": "Hi"}],
                                    "max_tokens": 3}),
    ]
    for method, path, body in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-test-1"}):
            resp = httpx.request(method, f"{stack.url}{path}", json=body, headers=headers,
                                 timeout=60)
            assert resp.status_code == 401, (path, headers, resp.text)
            assert resp.json()["error"]["code"] == "invalid_api_key"
        ok = httpx.request(method, f"{stack.url}{path}", json=body,
                           headers={"Authorization": "Bearer sk-test-1"}, timeout=60)
        assert ok.status_code == 200, (path, ok.text)
    assert httpx.get(f"{stack.url}/health").status_code == 200
    keyed_client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="sk-test-1", max_retries=0)
    assert keyed_client.models.list().data[0].id == MODEL
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{stack.url}/v1", api_key="bad", max_retries=0).models.list()
