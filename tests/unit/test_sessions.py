"""Session affinity between a node's replicas: who owns a session, and the relay of a request
to its owner over loopback (a mock transport stands in for the sibling)."""

from __future__ import annotations

import json
from collections import Counter

import httpx
from starlette.testclient import TestClient

from serve_app.config import AppConfig, ModelConfig
from serve_app.ingress import build_ingress
from serve_app.sessions import HOP, owner, session_of
from serve_app.tenants import Keyring, KeySync, KeyTable, Limiter, UsageMeter
from tests.fakes import FakeLLMHandle, FakeLLMServer

PEERS = [("me", "http://127.0.0.1:1001"), ("other", "http://127.0.0.1:1002")]
CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}


def session_owned_by(replica: str, peers=PEERS) -> str:
    return next(f"s{i}" for i in range(1000) if owner(f"s{i}", peers)[0] == replica)


def test_every_replica_computes_the_same_owner_and_sessions_spread():
    assert owner("abc", PEERS) == owner("abc", list(reversed(PEERS)))
    spread = Counter(owner(f"s{i}", PEERS)[0] for i in range(1000))
    assert set(spread) == {"me", "other"} and min(spread.values()) > 400


def test_a_replica_joining_moves_only_the_sessions_it_takes():
    three = [*PEERS, ("third", "http://127.0.0.1:1003")]
    moved = [s for s in (f"s{i}" for i in range(1000))
             if owner(s, PEERS)[0] != owner(s, three)[0]]
    assert all(owner(s, three)[0] == "third" for s in moved)
    assert 200 < len(moved) < 450


def test_the_session_is_the_header_else_openai_user_field():
    assert session_of({"x-session-id": "h"}, {"user": "u"}) == "h"
    assert session_of({}, {"user": "u"}) == "u"
    assert session_of({}, {"user": 42}) is None
    assert session_of({}, {"user": "x" * 1000}) is None


class Sibling:
    """The owner replica on the other end of the loopback relay."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(200, json={"served_by": "other"},
                              headers={"x-ratelimit-limit-requests": "9"})


def make(sibling):
    server = FakeLLMServer("a")
    sync = KeySync(lambda *a: None, KeyTable(), Limiter(), UsageMeter(), replica_id="me")
    sync.peers = list(PEERS)
    config = AppConfig(models=(ModelConfig(name="a", device="cpu"),))
    app = build_ingress(config, {"a": FakeLLMHandle(server)}, keyring=Keyring(sync=sync),
                        peer_transport=httpx.MockTransport(sibling))
    return TestClient(app), server


def test_a_session_owned_by_a_sibling_is_relayed_to_it_once():
    sibling = Sibling()
    client, server = make(sibling)
    theirs, mine = session_owned_by("other"), session_owned_by("me")
    with client:
        resp = client.post("/v1/chat/completions", json=CHAT,
                           headers={"X-Session-Id": theirs, "X-Request-Id": "rid-1"})
        assert resp.status_code == 200 and resp.json() == {"served_by": "other"}
        assert resp.headers["x-ratelimit-limit-requests"] == "9"
        (relayed,) = sibling.requests
        assert str(relayed.url) == "http://127.0.0.1:1002/v1/chat/completions"
        assert relayed.headers[HOP] == "1" and relayed.headers["x-request-id"] == "rid-1"
        assert json.loads(relayed.content) == CHAT and server.calls == []
        # Its own sessions, requests without one, and relayed ones are served here.
        client.post("/v1/chat/completions", json=CHAT, headers={"X-Session-Id": mine})
        client.post("/v1/chat/completions", json=CHAT)
        client.post("/v1/chat/completions", json=CHAT, headers={"X-Session-Id": theirs,
                                                               HOP: "1"})
        client.post("/generate", json={"prompt": "hi"}, headers={"X-Session-Id": mine})
        assert len(server.calls) == 4 and len(sibling.requests) == 1
        # OpenAI's user field works like the header.
        client.post("/v1/chat/completions", json={**CHAT, "user": theirs})
        assert len(sibling.requests) == 2


def test_an_unreachable_owner_leaves_the_request_here():
    def down(request):
        raise httpx.ConnectError("refused")

    client, server = make(down)
    with client:
        resp = client.post("/v1/chat/completions", json=CHAT,
                           headers={"X-Session-Id": session_owned_by("other")})
    assert resp.status_code == 200 and len(server.calls) == 1


def test_a_request_that_fails_its_checks_is_never_relayed():
    sibling = Sibling()
    client, _ = make(sibling)
    with client:
        resp = client.post("/v1/chat/completions", json={**CHAT, "model": "nope"},
                           headers={"X-Session-Id": session_owned_by("other")})
    assert resp.status_code == 404 and sibling.requests == []
