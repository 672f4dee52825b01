"""API keys at the HTTP face: 401, 403 and 429 in OpenAI's shape with the headers its clients
read, usage counted per key, /metrics behind a key. TestClient and fake LLM handles; the key
table is a real store's, loaded as a replica loads it; limits run on an injected clock."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading

import pytest
from pydantic import SecretStr, ValidationError
from starlette.testclient import TestClient

from serve_app.config import AppConfig, ModelConfig, Settings
from serve_app.ingress import build_ingress
from serve_app.tenants import Keyring, KeyStore, KeyTable, Limiter, UsageMeter
from tests.conftest import wait_for
from tests.fakes import FakeLLMHandle, FakeLLMServer

CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Stack:
    """The ingress over fake models ``a`` and ``b``, with the keys of a real store."""

    def __init__(self, tmp_path, *, static=(), exposed=False, allow_unauthenticated=False,
                 **config) -> None:
        self.clock = Clock()
        self.store = KeyStore(tmp_path / "keys.db").start()
        self.servers = {"a": FakeLLMServer("a"), "b": FakeLLMServer("b")}
        for server in self.servers.values():
            server.usage = (5, 7)
        self.keyring = Keyring(static, exposed=exposed,
                               allow_unauthenticated=allow_unauthenticated)
        self.keyring.table = KeyTable(static)
        self.keyring.limiter = Limiter(now=self.clock)
        self.keyring.meter = UsageMeter()
        self.config = AppConfig(models=(ModelConfig(name="a", device="cpu"),
                                        ModelConfig(name="b", device="cpu")), **config)
        app = build_ingress(self.config, {k: FakeLLMHandle(v) for k, v in self.servers.items()},
                            keyring=self.keyring)
        self.client = TestClient(app)

    def key(self, name: str, **kwargs) -> dict[str, str]:
        secret = self.store.create(name, **kwargs)
        self.reload()
        return {"Authorization": f"Bearer {secret}"}

    def reload(self) -> None:
        self.keyring.table.load(self.store.table())

    def chat(self, headers=None, **body):
        return self.client.post("/v1/chat/completions", json={**CHAT, **body}, headers=headers)


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path)
    with s.client:
        yield s


def assert_error(resp, status, code, type_=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
    if type_:
        assert err["type"] == type_
    return err


def test_a_named_key_is_used_then_revoked(stack):
    headers = stack.key("team-a")
    assert stack.chat(headers).status_code == 200
    assert_error(stack.chat(), 401, "invalid_api_key", "authentication_error")
    stack.store.revoke("team-a")
    stack.reload()
    err = assert_error(stack.chat(headers), 401, "invalid_api_key")
    assert "revoked" in err["message"]


def test_status_and_health_stay_open_while_everything_else_needs_the_key(stack):
    headers = stack.key("team-a")
    assert stack.client.get("/").status_code == 200
    assert stack.client.get("/health").status_code in (200, 503)
    for path in ("/v1/models", "/license"):
        assert_error(stack.client.get(path), 401, "invalid_api_key")
        assert stack.client.get(path, headers=headers).status_code == 200
    assert_error(stack.client.get("/metrics"), 401, "invalid_api_key")  # metrics_auth default
    assert stack.client.get("/metrics", headers=headers).status_code == 200


def test_metrics_open_on_loopback_without_keys_and_opened_only_by_choice(tmp_path):
    s = Stack(tmp_path)
    with s.client:
        assert s.client.get("/metrics").status_code == 200  # no key exists: nothing to ask for
    s = Stack(tmp_path / "open", metrics_auth=False)
    with s.client:
        s.key("team-a")
        assert s.client.get("/metrics").status_code == 200


def test_a_key_used_on_a_model_it_does_not_cover_is_403(stack):
    headers = stack.key("team-a", models=["a"])
    assert stack.chat(headers).status_code == 200
    err = assert_error(stack.chat(headers, model="b"), 403, "model_not_allowed",
                       "permission_error")
    assert err["param"] == "model"
    assert stack.servers["b"].calls == []
    cards = stack.client.get("/v1/models", headers=headers).json()["data"]
    assert [c["id"] for c in cards] == ["a"]
    assert_error(stack.client.get("/v1/models/b", headers=headers), 403, "model_not_allowed")


def test_requests_per_minute_429_with_openai_headers_and_none_below(stack):
    headers = stack.key("team-a", rpm=3)
    for expected in ("2", "1", "0"):
        resp = stack.chat(headers)
        assert resp.status_code == 200
        assert resp.headers["x-ratelimit-limit-requests"] == "3"
        assert resp.headers["x-ratelimit-remaining-requests"] == expected
    refused = stack.chat(headers)
    err = assert_error(refused, 429, "rate_limit_exceeded", "requests")
    assert "requests per minute" in err["message"]
    assert refused.headers["retry-after"] == "20"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert len(stack.servers["a"].calls) == 3  # the refused one never reached the model
    stack.clock.t += 20
    assert stack.chat(headers).status_code == 200
    # Another key is not touched by this one's limit.
    other = stack.key("team-b", rpm=3)
    assert stack.chat(other).status_code == 200


def test_tokens_per_minute_are_counted_as_vllm_counts_them(stack):
    headers = stack.key("team-a", tpm=30)  # each answer: 5 prompt + 7 completion tokens
    assert stack.chat(headers).headers["x-ratelimit-remaining-tokens"] == "30"
    assert stack.chat(headers).status_code == 200
    assert stack.chat(headers).status_code == 200
    err = assert_error(stack.chat(headers), 429, "rate_limit_exceeded", "tokens")
    assert "tokens per minute" in err["message"]


def test_a_stream_is_counted_from_vllm_usage_chunk_which_the_client_gets_only_if_asked(stack):
    headers = stack.key("team-a", tpm=1000)
    with stack.client.stream("POST", "/v1/chat/completions", headers=headers,
                             json={**CHAT, "stream": True}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert resp.headers["x-ratelimit-limit-tokens"] == "1000"
    assert lines[-1] == "data: [DONE]" and not any("usage" in line for line in lines)
    sent = json.loads(stack.servers["a"].calls[-1][1][1])
    assert sent["stream_options"] == {"include_usage": True}
    with stack.client.stream("POST", "/v1/chat/completions", headers=headers, json={
            **CHAT, "stream": True, "stream_options": {"include_usage": True}}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert json.loads(lines[-2][len("data: "):])["usage"]["total_tokens"] == 12
    rows = stack.keyring.meter.drain()
    assert rows == [[rows[0][0], "team-a", "a", 2, 10, 14]]


def test_concurrent_requests_per_key(stack):
    headers = stack.key("team-a", max_concurrent=1)
    held = threading.Event()
    release = threading.Event()
    server = stack.servers["a"]
    answer = server.openai

    async def slow(endpoint, body):
        held.set()
        while not release.is_set():  # the request runs until the test lets it end
            await asyncio.sleep(0.01)
        return await answer(endpoint, body)

    server.openai = slow
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(stack.chat, headers)
        assert held.wait(30)
        err = assert_error(stack.chat(headers), 429, "rate_limit_exceeded", "requests")
        assert "concurrent" in err["message"]
        release.set()
        assert first.result(30).status_code == 200
    assert stack.chat(headers).status_code == 200


def test_usage_per_key_in_metrics_labelled_by_name_never_secret(stack):
    headers = stack.key("team-a")
    stack.chat(headers)
    stack.client.post("/generate", json={"prompt": "hi"}, headers=headers)
    text = stack.client.get("/metrics", headers=headers).text
    assert 'serve_app_key_requests_total{key="team-a",model="a"} 2.0' in text
    assert 'serve_app_key_prompt_tokens_total{key="team-a",model="a"} 10.0' in text
    assert 'serve_app_key_completion_tokens_total{key="team-a",model="a"} 14.0' in text
    assert headers["Authorization"].split()[1] not in text


def test_static_keys_are_unnamed_keys(tmp_path):
    s = Stack(tmp_path, static=["sk-static-1"])
    with s.client:
        assert_error(s.chat(), 401, "invalid_api_key")
        assert s.chat({"Authorization": "Bearer sk-static-1"}).status_code == 200
        text = s.client.get("/metrics", headers={"Authorization": "Bearer sk-static-1"}).text
        assert 'serve_app_key_requests_total{key="static",model="a"} 1.0' in text


def test_empty_bearer_never_matches(tmp_path):
    s = Stack(tmp_path, static=["sk-static-1"])
    with s.client:
        for value in ("Bearer", "Bearer ", "Bearer  ", ""):
            assert_error(s.chat({"Authorization": value}), 401, "invalid_api_key")


def test_exposed_without_keys_needs_a_key_and_allow_unauthenticated_opens_it(tmp_path):
    closed = Stack(tmp_path / "closed", exposed=True)
    with closed.client:
        assert_error(closed.chat(), 401, "invalid_api_key")
    opened = Stack(tmp_path / "open", exposed=True, allow_unauthenticated=True)
    with opened.client:
        assert opened.chat().status_code == 200
        assert 'key="anonymous"' in opened.client.get("/metrics").text


@pytest.mark.parametrize("keys", [[""], ["  "], ["ok", ""], ["has space"]])
def test_empty_keys_are_refused_in_the_configuration(keys):
    with pytest.raises(ValidationError, match="empty or holds whitespace"):
        AppConfig(api_keys=tuple(SecretStr(k) for k in keys))


def test_empty_entries_of_the_environment_list_make_no_key(monkeypatch):
    monkeypatch.setenv("SERVE_APP_API_KEYS", " , ,")
    assert Settings().to_app_config().api_keys == ()


def test_the_fair_queue_lets_another_key_in_while_a_busy_one_waits_its_turn(tmp_path):
    stack = Stack(tmp_path)
    model = ModelConfig(name="a", device="cpu", fair_slots=1)
    stack.servers = {"a": FakeLLMServer("a")}
    app = build_ingress(AppConfig(models=(model,)), {"a": FakeLLMHandle(stack.servers["a"])},
                        keyring=stack.keyring)
    stack.client = TestClient(app)
    busy, other = stack.key("busy"), stack.key("other")
    release = threading.Event()
    started: list[str] = []
    answer = stack.servers["a"].openai

    async def slow(endpoint, body):
        started.append(json.loads(body)["messages"][0]["content"])
        while not release.is_set():
            await asyncio.sleep(0.01)
        return await answer(endpoint, body)

    stack.servers["a"].openai = slow

    def ask(headers, text):
        return stack.client.post("/v1/chat/completions", headers=headers, json={
            **CHAT, "messages": [{"role": "user", "content": text}]})

    with stack.client, concurrent.futures.ThreadPoolExecutor(3) as pool:
        first = pool.submit(ask, busy, "busy-1")
        wait_for(lambda: started == ["busy-1"], timeout=30, interval=0.01, what="busy-1")
        second = pool.submit(ask, busy, "busy-2")  # the one slot is taken: it waits
        third = pool.submit(ask, other, "other-1")  # nothing of its own running: at once
        wait_for(lambda: "other-1" in started, timeout=30, interval=0.01, what="other-1")
        assert "busy-2" not in started
        release.set()
        assert [f.result(30).status_code for f in (first, second, third)] == [200] * 3
    assert started[:2] == ["busy-1", "other-1"]


def test_fair_slots_default_to_the_local_engine_and_leave_handles_unbounded():
    from serve_app.ingress import IngressApp

    local, behind = ModelConfig(name="a", max_ongoing_requests=8), ModelConfig(name="b")
    app = IngressApp(AppConfig(models=(local, behind)),
                     {n: FakeLLMHandle(FakeLLMServer(n)) for n in ("a", "b")},
                     limits={"a": 10})
    assert app._models["a"].fair.slots == 8 and app._models["b"].fair.slots is None


def test_requests_never_reach_the_key_actor_only_the_background_round_does(tmp_path):
    """Key lookup, limits and usage stay in the replica's memory: a hundred requests, limited
    and counted, make no call to the key actor; its next round carries their usage."""
    from serve_app.tenants import KeySync

    store = KeyStore(tmp_path / "keys.db").start()
    secret = store.create("team-a", rpm=1000, tpm=100_000, max_concurrent=4)
    calls: list[dict] = []

    async def fetch(replica_id, version, report):
        calls.append(report)
        return {"version": store.version(),
                "table": None if version == store.version() else store.table(),
                "shares": {"team-a": [1.0, 4]}, "replicas": 1, "peers": []}

    async def never(seconds):  # the background round does not come while requests run
        await asyncio.Event().wait()

    sync = KeySync(fetch, KeyTable(), Limiter(), UsageMeter(), replica_id="r1", sleep=never)
    asyncio.run(sync.first())
    assert len(calls) == 1
    server = FakeLLMServer("a")
    server.usage = (5, 7)
    app = build_ingress(AppConfig(models=(ModelConfig(name="a", device="cpu"),)),
                        {"a": FakeLLMHandle(server)}, keyring=Keyring(sync=sync))
    headers = {"Authorization": f"Bearer {secret}"}
    with TestClient(app) as client:
        for _ in range(100):
            resp = client.post("/v1/chat/completions", json=CHAT, headers=headers)
            assert resp.status_code == 200
            assert resp.headers["x-ratelimit-limit-requests"] == "1000"
        assert len(calls) == 1
    asyncio.run(sync.once())
    (_, rows), = calls[-1]["usage"]
    assert [r[1:] for r in rows] == [["team-a", "a", 100, 500, 700]]
    assert calls[-1]["asked"] == {"team-a": 100}
