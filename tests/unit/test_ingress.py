"""The starlette app through TestClient, with fake LLM handles: no Ray, no vLLM."""

from __future__ import annotations

import json

import pytest
from pydantic import SecretStr
from ray.serve.exceptions import BackPressureError
from starlette.testclient import TestClient

from serve_app.config import AppConfig, ModelConfig
from serve_app.ingress import build_ingress
from tests.conftest import wait_until
from tests.fakes import FakeLLMHandle, FakeLLMServer, serving_state

CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}


def make_client(**config_kwargs):
    servers = {"a": FakeLLMServer("a"), "b": FakeLLMServer("b")}
    config = AppConfig(
        models=(ModelConfig(name="a", device="cpu"), ModelConfig(name="b", device="cpu")),
        **config_kwargs,
    )
    app = build_ingress(config, {k: FakeLLMHandle(v) for k, v in servers.items()})
    return TestClient(app), servers


@pytest.fixture
def client():
    c, servers = make_client()
    with c:
        yield c, servers


def assert_openai_error(resp, status, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if code:
        assert err["code"] == code
    return err


def test_routes_by_model_and_passes_raw_body(client):
    c, servers = client
    body = json.dumps({**CHAT, "model": "b"}).encode()
    resp = c.post("/v1/chat/completions", content=body)
    assert resp.status_code == 200
    assert servers["b"].calls == [("openai", ("chat", body))]
    assert servers["a"].calls == []


def test_missing_model_goes_to_the_first(client):
    c, servers = client
    resp = c.post("/v1/completions", json={"prompt": "x"})
    assert resp.status_code == 200
    assert servers["a"].calls[0][1][0] == "completions"


def test_unknown_model_is_404(client):
    c, _ = client
    err = assert_openai_error(c.post("/v1/chat/completions", json={**CHAT, "model": "zz"}),
                              404, "model_not_found")
    assert err["param"] == "model"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**CHAT, "n": 10_000}, "n"),
        ({**CHAT, "n": 0}, "n"),
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "max_tokens": -5}, "max_tokens"),
        ({**CHAT, "max_tokens": 10**9}, "max_tokens"),
        ({**CHAT, "max_tokens": "ten"}, "max_tokens"),
        ({**CHAT, "stream": "yes"}, "stream"),
        ({**CHAT, "model": 42}, "model"),
    ],
)
def test_bad_fields_are_400_before_reaching_a_replica(client, body, param):
    c, servers = client
    err = assert_openai_error(c.post("/v1/chat/completions", json=body), 400)
    assert err["param"] == param
    assert not servers["a"].calls


@pytest.mark.parametrize(
    ("raw", "code"),
    [(b"{nope", "invalid_json"), (b"[1]", "invalid_json"), (b"", "invalid_json"),
     (b"\xff\xfe{}", "invalid_encoding")],
)
def test_malformed_bodies(client, raw, code):
    c, _ = client
    for path in ("/v1/chat/completions", "/v1/completions", "/generate", "/chat/generate"):
        assert_openai_error(c.post(path, content=raw), 400, code)


def test_body_limit_by_header_and_by_stream():
    c, servers = make_client(max_body_bytes=100)
    with c:
        assert_openai_error(c.post("/v1/completions", content=b"x" * 101), 413,
                            "request_too_large")

        def chunks():  # no Content-Length: the limit must hold while reading
            for _ in range(10):
                yield b"x" * 50

        assert_openai_error(c.post("/v1/completions", content=chunks()), 413)
        # A Content-Length that is not a number is refused, not ignored (the license server's
        # rule too: both read with license_contract.read_bounded).
        for declared in ("abc", "-1", ""):
            resp = c.post("/v1/completions", content=b'{"prompt": "x"}',
                          headers={"Content-Length": declared})
            assert_openai_error(resp, 400, "invalid_content_length")
        assert not servers["a"].calls
        assert c.post("/v1/completions", json={"prompt": "ok"}).status_code == 200


def test_streaming_relays_chunks_in_order(client):
    c, servers = client
    with c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        text = "".join(resp.iter_text())
    assert text == "".join(f"data: {{\"n\": {i}}}\n\n" for i in range(4)) + "data: [DONE]\n\n"
    assert servers["a"].streams[0].cancelled is False


def test_stream_error_before_first_chunk_keeps_status():
    c, servers = make_client()

    def error_stream(endpoint, body):
        from tests.fakes import FakeStream

        return FakeStream([(400, json.dumps({"error": {"message": "bad", "type": "x",
                                                       "param": None, "code": "c"}}))])

    servers["a"].openai_stream = error_stream
    with c:
        resp = c.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == "bad"


def test_backpressure_is_503_with_retry_after():
    c, servers = make_client()
    servers["a"].raise_on_call = BackPressureError(num_queued_requests=9, max_queued_requests=8)
    with c:
        resp = c.post("/v1/chat/completions", json=CHAT)
        assert_openai_error(resp, 503, "overloaded")
        assert resp.headers["retry-after"] == "1"
        resp = c.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert_openai_error(resp, 503)


def test_replica_failure_is_a_clean_500_without_details():
    c, servers = make_client()
    servers["a"].raise_on_call = RuntimeError("secret internals")
    with c:
        err = assert_openai_error(c.post("/v1/chat/completions", json=CHAT), 500)
        assert "secret" not in err["message"]
        servers["a"].raise_on_call = None
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_auth_on_every_inference_and_model_route():
    c, servers = make_client(api_keys=(SecretStr("k1"), SecretStr("k2")))
    routes = [
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/a", None),
        ("POST", "/v1/chat/completions", CHAT),
        ("POST", "/v1/completions", {"prompt": "x"}),
        ("POST", "/generate", {"prompt": "x"}),
        ("POST", "/chat/generate", {"messages": [{"role": "user", "content": "x"}]}),
    ]
    with c:
        for method, path, body in routes:
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "k1"},
                            {"Authorization": "Basic k1"}):
                resp = c.request(method, path, json=body, headers=headers)
                assert_openai_error(resp, 401, "invalid_api_key")
            for key in ("k1", "k2"):
                resp = c.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"})
                assert resp.status_code == 200, (path, resp.text)
        assert c.get("/health").status_code == 200
        assert c.get("/").status_code == 200
    assert servers["a"].calls  # authorized calls arrived, unauthorized ones did not
    assert len(servers["a"].calls) == 2 * 4


def test_models_list_and_retrieve(client):
    c, _ = client
    data = c.get("/v1/models").json()
    assert [m["id"] for m in data["data"]] == ["a", "b"]
    assert c.get("/v1/models/b").json()["id"] == "b"
    assert_openai_error(c.get("/v1/models/zz"), 404, "model_not_found")


def test_status_health_and_metrics(client):
    c, _ = client
    assert c.get("/").json()["status"] == "idle"
    assert c.get("/health").json() == {"status": "ok"}
    c.post("/v1/chat/completions", json=CHAT)
    text = c.get("/metrics").text
    assert 'serve_app_requests_total{route="chat",status="200"} 1.0' in text
    assert 'serve_app_engine_unfinished_requests{model_name="a"} 0' in text
    assert 'serve_app_engine_unfinished_requests{model_name="b"} 0' in text


def _request_counts(c, headers=None):
    """``/metrics``' response counts by (route, status) and latency counts by route."""
    from prometheus_client.parser import text_string_to_metric_families

    counts, timed = {}, {}
    for family in text_string_to_metric_families(c.get("/metrics", headers=headers).text):
        for sample in family.samples:
            if sample.name == "serve_app_requests_total":
                counts[sample.labels["route"], sample.labels["status"]] = sample.value
            elif sample.name == "serve_app_request_seconds_count":
                timed[sample.labels["route"]] = sample.value
    return counts, timed


def test_metrics_count_every_response_by_route_and_status_refusals_included():
    from serve_app.licensing.gate import LicenseGate

    async def current():
        return gate.state

    gate = LicenseGate(current, refresh_s=0.01)
    gate.state = serving_state()
    servers = {"a": FakeLLMServer("a"), "b": FakeLLMServer("b")}
    config = AppConfig(models=(ModelConfig(name="a", device="cpu"),
                               ModelConfig(name="b", device="cpu")),
                       api_keys=(SecretStr("k"),), max_body_bytes=100)
    # Model a admits nothing: every request for it is refused as overloaded.
    app = build_ingress(config, {k: FakeLLMHandle(v) for k, v in servers.items()},
                        license_gate=gate, limits={"a": 0})
    key = {"Authorization": "Bearer k"}
    b = {**CHAT, "model": "b"}
    with TestClient(app) as c:
        assert c.post("/v1/chat/completions", json=b).status_code == 401
        gate.state = {"allowed": False, "status": 403, "code": "license_revoked", "message": "r"}
        assert c.post("/v1/completions", json={"prompt": "x"}, headers=key).status_code == 403
        gate.state = {"allowed": False, "status": 503, "code": "license_checkin_overdue",
                      "message": "overdue"}
        assert c.post("/generate", json={"prompt": "x"}, headers=key).status_code == 503
        gate.state = serving_state()
        assert c.post("/v1/chat/completions", content=b"x" * 101, headers=key).status_code == 413
        assert c.post("/v1/chat/completions", content=b"{nope", headers=key).status_code == 400
        assert c.post("/chat/generate", json={"messages": [{"role": "user", "content": "x"}]},
                      headers=key).status_code == 503
        assert c.post("/v1/chat/completions", json={**CHAT, "model": "zz"},
                      headers=key).status_code == 404
        for path in ("/v1/models/zz", "/v1/models/a/b/c"):
            assert c.get(path, headers=key).status_code == 404
        for path in ("/nope", "/nope/2", "/v1/chat/completions/x"):
            assert c.get(path).status_code == 404
        assert c.get("/v1/chat/completions").status_code == 405
        servers["b"].raise_on_call = RuntimeError("replica down")
        assert c.post("/v1/chat/completions", json=b, headers=key).status_code == 500
        servers["b"].raise_on_call = None
        assert c.post("/v1/chat/completions", json=b, headers=key).status_code == 200
        with c.stream("POST", "/v1/chat/completions", json={**b, "stream": True},
                      headers=key) as resp:
            assert resp.status_code == 200
            resp.read()
        assert c.get("/health").status_code == 200
        counts, timed = _request_counts(c, key)
        assert counts == {
            ("chat", "401"): 1, ("completions", "403"): 1, ("maritalk_raw", "503"): 1,
            ("chat", "413"): 1, ("chat", "400"): 1, ("maritalk_chat", "503"): 1,
            ("chat", "404"): 1, ("model", "404"): 2, ("unmatched", "404"): 3,
            ("chat", "405"): 1, ("chat", "500"): 1, ("chat", "200"): 2, ("health", "200"): 1,
        }
        routes = {route for route, _ in counts}
        assert timed == {r: sum(n for (q, _), n in counts.items() if q == r) for r in routes}
        # The scrape is counted once its own headers left.
        assert _request_counts(c, key)[0][("metrics", "200")] == 1


def test_unknown_route_and_method_use_openai_shape(client):
    c, _ = client
    assert_openai_error(c.get("/nope"), 404, "not_found")
    assert_openai_error(c.get("/v1/chat/completions"), 405)


def test_maritalk_routes_pass_kind(client):
    c, servers = client
    assert c.post("/generate", json={"prompt": "x"}).json()["output"] == "Paris"
    c.post("/chat/generate", json={"messages": [{"role": "user", "content": "x"}], "model": "b"})
    assert servers["a"].calls[0][1][0] == "raw"
    assert servers["b"].calls[0][1][0] == "chat"


def test_license_gate_refuses_with_the_right_status_and_keeps_status_routes_open():
    from serve_app.licensing.gate import LicenseGate

    async def current():  # the background refresh re-reads what the test sets
        return gate.state

    gate = LicenseGate(current, refresh_s=0.01)
    servers = {"a": FakeLLMServer("a"), "b": FakeLLMServer("b")}
    config = AppConfig(models=(ModelConfig(name="a", device="cpu"),
                               ModelConfig(name="b", device="cpu")))

    async def license_status():
        return {"state": "license_checkin_overdue", "license_id": "lic_1"}

    app = build_ingress(config, {k: FakeLLMHandle(v) for k, v in servers.items()},
                        license_gate=gate, license_status=license_status)
    with TestClient(app) as c:
        _check_gate(c, gate, servers)


def _check_gate(c, gate, servers):
    gate.state = {"allowed": False, "status": 503, "code": "license_checkin_overdue",
                  "message": "overdue"}
    resp = c.post("/v1/chat/completions", json=CHAT)
    err = assert_openai_error(resp, 503, "license_checkin_overdue")
    assert err["type"] == "license_error" and resp.headers["retry-after"] == "60"
    gate.state = {"allowed": False, "status": 403, "code": "license_revoked", "message": "r"}
    for path, body in [("/v1/completions", {"prompt": "x"}), ("/generate", {"prompt": "x"}),
                       ("/chat/generate", {"messages": [{"role": "user", "content": "x"}]})]:
        assert_openai_error(c.post(path, json=body), 403, "license_revoked")
    assert not servers["a"].calls
    assert c.get("/health").status_code == 200
    assert c.get("/v1/models").status_code == 200
    assert c.get("/license").json()["license_id"] == "lic_1"
    gate.state = serving_state()
    assert c.post("/v1/chat/completions", json=CHAT).status_code == 200


class _AsyncGenServer(FakeLLMServer):
    """Streams from a real async generator, as LLMServer does, and records its closing. With
    ``hold`` (a threading.Event), a stream waits after its first event until it is set."""

    def __init__(self, name: str = "a") -> None:
        super().__init__(name)
        self.closed = 0
        self.hold = None

    async def openai_stream(self, endpoint, body):
        import asyncio

        try:
            yield 200, 'data: {"n": 0}\n\n'
            if self.hold is not None:
                assert await asyncio.to_thread(self.hold.wait, 60)
            for i in range(1, 4):
                yield f'data: {{"n": {i}}}\n\n'
            yield "data: [DONE]\n\n"
        finally:
            self.closed += 1


def test_local_model_streams_through_local_handle_and_is_admitted_up_to_its_limit():
    """The colocated layout: the model lives in this process, the app bounds it itself."""
    import threading

    from serve_app.deployments import LocalHandle

    server = _AsyncGenServer("a")
    server.hold = threading.Event()
    config = AppConfig(models=(ModelConfig(name="a", device="cpu"),))
    app = build_ingress(config, {"a": LocalHandle(server)}, limits={"a": 1})
    with TestClient(app) as c:
        holding = threading.Event()
        results = {}

        def long_stream():
            with c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                lines = r.iter_lines()
                results["first"] = next(lines)
                holding.set()
                results["rest"] = [ln for ln in lines if ln]

        t = threading.Thread(target=long_stream)
        t.start()
        assert holding.wait(10)
        err = assert_openai_error(c.post("/v1/completions", json={"prompt": "x"}), 503,
                                  "overloaded")
        assert "capacity" in err["message"]
        assert c.post("/generate", json={"prompt": "x"}).status_code == 503
        server.hold.set()
        t.join(60)
        assert results["first"] == 'data: {"n": 0}'
        assert results["rest"][-1] == "data: [DONE]" and len(results["rest"]) == 4
        # The slot came back: the next request is served, its unary call ran locally.
        resp = c.post("/v1/completions", json={"prompt": "x"})
        assert resp.status_code == 200 and resp.json()["object"] == "completions"
        assert c.get("/").json()["status"] == "idle"
    assert server.closed == 1


def test_local_stream_cancel_closes_the_generator():
    import asyncio

    from serve_app.deployments import LocalHandle

    server = _AsyncGenServer("a")

    async def scenario():
        stream = LocalHandle(server).options(method_name="openai_stream", stream=True).remote(
            "chat", b"{}")
        assert await stream.__anext__() == (200, 'data: {"n": 0}\n\n')
        stream.cancel()
        stream.cancel()  # idempotent
        await wait_until(lambda: server.closed == 1, timeout=30, what="the generator's closing")
        finished = LocalHandle(server).options(method_name="openai_stream", stream=True).remote(
            "chat", b"{}")
        assert len([x async for x in finished]) == 5
        finished.cancel()  # a finished stream has nothing left to close
        assert server.closed == 2
        assert await LocalHandle(server).ready.remote() == "a"

    asyncio.run(scenario())


def test_a_client_gone_before_the_first_chunk_frees_its_slot_and_cancels():
    """The body iterator never starts when sending the headers already fails: the slot and the
    replica's stream must be released anyway, or the admission limit leaks shut."""
    import asyncio

    server = FakeLLMServer("a")
    config = AppConfig(models=(ModelConfig(name="a", device="cpu"),))
    app = build_ingress(config, {"a": FakeLLMHandle(server)}, limits={"a": 1})
    body = json.dumps({**CHAT, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "root_path": "", "query_string": b"", "server": ("t", 80), "client": ("c", 1),
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}

    async def scenario():
        sent = []

        async def receive():
            if not sent:
                sent.append("body")
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)

        async def send(message):
            if message["type"] == "http.response.start":
                raise OSError("connection reset by peer")

        with pytest.raises(OSError):
            await app(scope, receive, send)

    asyncio.run(scenario())
    assert server.streams and server.streams[0].cancelled
    with TestClient(app) as c:  # the one slot is free again
        assert c.get("/").json()["status"] == "idle"
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200


@pytest.fixture
def serve_log(caplog):
    """What the app logs to "ray.serve" (which does not propagate to the root logger)."""
    import logging

    logger = logging.getLogger("ray.serve")
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


def test_a_failing_readiness_check_is_logged_once_per_model_and_retried(serve_log):
    """/health stays 503 while a model's replica fails to start: the log must say why."""
    import logging
    import threading

    servers = {"a": FakeLLMServer("a"), "b": FakeLLMServer("b")}
    ready = {"a": threading.Event(), "b": threading.Event()}

    def failing(name, times):
        attempts = []

        async def check():
            attempts.append(1)
            if len(attempts) <= times:
                raise RuntimeError(f"replica of {name} failed to start ({len(attempts)})")
            ready[name].set()
            return name

        return check

    servers["a"].ready, servers["b"].ready = failing("a", 3), failing("b", 1)
    config = AppConfig(models=(ModelConfig(name="a", device="cpu"),
                               ModelConfig(name="b", device="cpu")))
    app = build_ingress(config, {k: FakeLLMHandle(v) for k, v in servers.items()},
                        readiness_retry_s=0.0)
    serve_log.set_level(logging.INFO, logger="ray.serve")
    with TestClient(app) as c:
        assert ready["a"].wait(10) and ready["b"].wait(10)
        assert c.get("/health").json() == {"status": "ok"}
    lines = [r for r in serve_log.records if "readiness check" in r.getMessage()]
    # The rate of the lines between is FailureLog's, tested through the license gate.
    first = sorted(r.getMessage() for r in lines if "failed:" in r.getMessage())
    assert first == [
        "The readiness check of model a failed: RuntimeError('replica of a failed to start (1)')",
        "The readiness check of model b failed: RuntimeError('replica of b failed to start (1)')",
    ]
    assert all(r.exc_info and r.levelname == "WARNING" for r in lines if "failed:" in r.getMessage())
    back = sorted(r.getMessage().rsplit(" in ", 1)[0] for r in lines if "again" in r.getMessage())
    assert back == ["The readiness check of model a works again after 3 failures",
                    "The readiness check of model b works again after 1 failure"]


def test_every_response_carries_the_callers_request_id(client):
    c, _ = client
    rid = {"X-Request-Id": "trace-42:a/b+c=d.e_f"}
    responses = [
        c.post("/v1/chat/completions", json=CHAT, headers=rid),
        c.post("/v1/chat/completions", json={**CHAT, "n": 0}, headers=rid),
        c.post("/generate", content=b"{", headers=rid),
        c.get("/nope", headers=rid),
        c.get("/health", headers=rid),
        c.get("/v1/chat/completions", headers=rid),
    ]
    with c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True},
                  headers=rid) as resp:
        resp.read()
        responses.append(resp)
    for resp in responses:
        assert resp.headers.get_list("x-request-id") == ["trace-42:a/b+c=d.e_f"], resp.url


@pytest.mark.parametrize("incoming", [None, "", "x" * 129, "a b", "a\tb", "-leading", "é".encode(),
                                      "id;drop", "<script>"])
def test_a_missing_or_unsafe_request_id_is_replaced(client, incoming):
    c, _ = client
    headers = {} if incoming is None else {"X-Request-Id": incoming}
    first = c.post("/v1/completions", json={"prompt": "x"}, headers=headers)
    second = c.post("/v1/completions", json={"prompt": "x"}, headers=headers)
    ids = [first.headers["x-request-id"], second.headers["x-request-id"]]
    assert ids[0] != ids[1]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_a_replica_failure_is_logged_with_traceback_and_id_and_hidden(serve_log):
    c, servers = make_client()
    servers["a"].raise_on_call = RuntimeError("secret internals")
    with c:
        for body in (CHAT, {**CHAT, "stream": True}):
            resp = c.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "r-1"})
            err = assert_openai_error(resp, 500, "internal_error")
            assert "secret" not in err["message"] and "r-1" in err["message"]
            assert resp.headers["x-request-id"] == "r-1"
    records = [r for r in serve_log.records if "r-1" in r.getMessage()]
    assert len(records) == 2
    assert all(r.exc_info and "secret internals" in str(r.exc_info[1]) for r in records)


def test_an_unexpected_error_in_the_app_is_a_500_with_the_id_and_logged(serve_log):
    c, servers = make_client()

    def broken(kind, body):
        raise KeyError("bug in the app")

    with c:
        # A bug on the app's own path: the handle call raises before there is anything to await.
        servers["a"].maritalk = broken
        resp = c.post("/generate", json={"prompt": "x"}, headers={"X-Request-Id": "r-2"})
    err = assert_openai_error(resp, 500, "internal_error")
    assert "bug" not in err["message"] and "r-2" in err["message"]
    assert resp.headers["x-request-id"] == "r-2"
    logged = [r for r in serve_log.records if "r-2" in r.getMessage()]
    assert logged and logged[0].exc_info and isinstance(logged[0].exc_info[1], KeyError)


def test_a_replica_5xx_value_names_the_id_and_is_logged(serve_log):
    c, servers = make_client()

    async def fails(endpoint, body):
        return 500, json.dumps({"error": {"message": "The model server failed", "type": "x",
                                          "param": None, "code": "internal_error"}})

    servers["a"].openai = fails
    with c:
        resp = c.post("/v1/completions", json={"prompt": "x"}, headers={"X-Request-Id": "r-3"})
    err = assert_openai_error(resp, 500, "internal_error")
    assert "r-3" in err["message"]
    assert any("r-3" in r.getMessage() and "500" in r.getMessage() for r in serve_log.records)


def test_a_mid_stream_failure_is_in_band_and_logged_with_the_id(serve_log):
    from tests.fakes import FakeStream

    c, servers = make_client()

    def stream(endpoint, body):
        return FakeStream([(200, 'data: {"n": 0}\n\n')], fail_after=1,
                          error=RuntimeError("engine died mid-stream"))

    servers["a"].openai_stream = stream
    with c, c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True},
                     headers={"X-Request-Id": "r-4"}) as resp:
        text = resp.read().decode()
    assert resp.status_code == 200 and resp.headers["x-request-id"] == "r-4"
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    err = json.loads(events[-2].removeprefix("data: "))["error"]
    assert err["code"] == "internal_error" and "r-4" in err["message"]
    logged = [r for r in serve_log.records if "r-4" in r.getMessage()]
    assert logged and "engine died" in str(logged[0].exc_info[1])


def test_maritalk_bodies_are_checked_before_the_replica(client):
    c, servers = client
    for body, param in [({"prompt": "x", "top_p": 0}, "top_p"),
                        ({"prompt": "x", "temperature": -1}, "temperature"),
                        ({"prompt": "x", "typo": 1}, "typo"),
                        ({"prompt": None}, "prompt")]:
        assert assert_openai_error(c.post("/generate", json=body), 400)["param"] == param
    assert not servers["a"].calls


def test_the_request_id_middleware_is_the_last_resort(serve_log):
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.routing import Route

    from serve_app.ingress import RequestIdMiddleware

    async def bug(request):
        raise ZeroDivisionError("no handler takes this")

    app = Starlette(routes=[Route("/", bug)], middleware=[Middleware(RequestIdMiddleware)])
    with TestClient(app, raise_server_exceptions=False) as c:
        resp = c.get("/", headers={"X-Request-Id": "r-5"})
    err = assert_openai_error(resp, 500, "internal_error")
    assert "r-5" in err["message"] and "no handler" not in err["message"]
    assert resp.headers.get_list("x-request-id") == ["r-5"]
    logged = [r for r in serve_log.records if "r-5" in r.getMessage()]
    assert logged and isinstance(logged[0].exc_info[1], ZeroDivisionError)


def test_failures_reach_stderr_when_serve_logs_to_its_file_only(tmp_path, capsys):
    """Serve's throughput-optimized mode leaves its logger a file handler only; a failure must
    still show on the terminal (Ray forwards a replica's stderr to the driver)."""
    import logging

    from serve_app import request_ids

    serve_logger = logging.getLogger("ray.serve")
    saved = (serve_logger.handlers[:], request_ids.failures.handlers[:])
    file_handler = logging.FileHandler(tmp_path / "replica.log")
    serve_logger.handlers[:] = [file_handler]
    request_ids.failures.handlers[:] = []
    try:
        c, servers = make_client()
        servers["a"].raise_on_call = RuntimeError("disk on fire")
        with c:
            resp = c.post("/v1/completions", json={"prompt": "x"},
                          headers={"X-Request-Id": "r-6"})
        assert resp.status_code == 500
    finally:
        file_handler.close()
        serve_logger.handlers[:], request_ids.failures.handlers[:] = saved
    for text in ((tmp_path / "replica.log").read_text(), capsys.readouterr().err):
        assert "r-6" in text and "disk on fire" in text and "Traceback" in text


def test_a_client_gone_while_sending_its_body_is_no_error(serve_log):
    import asyncio

    server = FakeLLMServer("a")
    config = AppConfig(models=(ModelConfig(name="a", device="cpu"),))
    app = build_ingress(config, {"a": FakeLLMHandle(server)})
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "root_path": "", "query_string": b"", "server": ("t", 80), "client": ("c", 1),
             "headers": [(b"content-type", b"application/json")]}
    messages = [{"type": "http.request", "body": b'{"prompt": ', "more_body": True},
                {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    assert sent == [] and not server.calls
    assert not [r for r in serve_log.records if r.levelname == "ERROR"]
