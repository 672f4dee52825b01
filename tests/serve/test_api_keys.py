"""Named API keys against a running stack: Ray Serve in-process, the key actor on the head, the
key store on disk, two colocated replicas on one port, licensed by a real license server on
loopback; the LLM is a stand-in that reports usage as vLLM does. Keys are changed with the
operator's commands while the app serves, and every change is awaited as a condition (replicas
hear within a round, about a second)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os

import httpx
import pytest

from serve_app.config import RAY_SERVE_ENV, TELEMETRY_OFF_ENV, AppConfig, ModelConfig
from serve_app.llm_server import LLMServer
from serve_app.tenants import keys_command, usage_command
from tests.conftest import LicenseServerProcess, free_port, wait_for
from tests.fakes import FakeLLMServer

pytestmark = pytest.mark.serve

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class UsageFakeLLM(LLMServer):
    """``LLMServer`` with a scripted replica behind it: 5 prompt and 7 completion tokens an
    answer, as vLLM's ``usage`` says."""

    async def load(self):
        self._fake = FakeLLMServer(self._config.name)
        self._fake.usage = (5, 7)

    async def openai(self, endpoint, body):
        status, text = await self._fake.openai(endpoint, body)
        return status, json.dumps({**json.loads(text), "pid": os.getpid()})  # who served it

    async def openai_stream(self, endpoint, body):
        for item in self._fake.openai_stream(endpoint, body)._items:
            yield item

    async def maritalk(self, kind, body):
        return await self._fake.maritalk(kind, body)

    async def check_health(self):
        pass

    async def metrics_text(self):
        return await self._fake.metrics_text()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    import ray
    from ray import serve

    from serve_app.builder import build_app_from_config

    for key, value in RAY_SERVE_ENV.items():
        os.environ.setdefault(key, value)
    data = tmp_path_factory.mktemp("keys")
    store = str(data / "api_keys.db")
    server = LicenseServerProcess(data / "server").start()
    _, key = server.issue(heartbeat_interval_s=1.0, grace_period_s=3600)
    license = server.license_config(key, data / "ledger.db", report_interval_s=1.0,
                                    actor_name=f"license_keys_{os.getpid()}")
    port = free_port()
    model = ModelConfig(name="m", device="cpu", min_replicas=2, max_replicas=2)
    config = AppConfig(models=(model,), http_port=port, key_store_path=store, license=license)
    ray.init(address="local", include_dashboard=False, num_cpus=4,
             runtime_env={"env_vars": dict(TELEMETRY_OFF_ENV)})
    try:
        # The replicas listen on `port` themselves, as `python -m serve_app` runs them: no proxy.
        serve.start(proxy_location="Disabled")
        serve.run(build_app_from_config(config, llm_cls=UsageFakeLLM), name="keys",
                  route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.post(f"{url}/v1/chat/completions", json=CHAT).status_code == 200,
                 timeout=120, what="the app")
        yield {"url": url, "store": store, "config": config, "server": server}
    finally:
        serve.shutdown()
        ray.shutdown()
        server.stop()


def keys(stack, *argv, capsys) -> str:
    assert keys_command(list(argv), store=stack["store"]) == 0
    return capsys.readouterr().out.strip()


def chat(stack, secret=None, **body):
    # A connection each: the kernel spreads them over both replicas.
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.post(f"{stack['url']}/v1/chat/completions", json={**CHAT, **body},
                      headers=headers, timeout=30)


def on_every_replica(stack, predicate, n=8):
    """``predicate`` holds for ``n`` requests in a row, each on a new connection (so both
    replicas answer some of them)."""
    return all(predicate() for _ in range(n))


def test_keys_created_rotated_and_revoked_while_serving(stack, capsys):
    secret = keys(stack, "create", "--name", "team-a", capsys=capsys)
    wait_for(lambda: on_every_replica(stack, lambda: chat(stack, secret).status_code == 200
                                      and chat(stack).status_code == 401),
             timeout=30, interval=0.3, what="the new key on every replica, and keys required")
    assert chat(stack, "sak_000000000000_" + "x" * 43).status_code == 401

    rotated = keys(stack, "rotate", "team-a", "--grace", "3s", capsys=capsys)
    wait_for(lambda: on_every_replica(stack, lambda: chat(stack, rotated).status_code == 200),
             timeout=30, interval=0.3, what="the rotated secret on every replica")
    # Within its grace the old secret still works; then it stops.
    wait_for(lambda: on_every_replica(stack, lambda: chat(stack, secret).status_code == 401),
             timeout=30, interval=0.3, what="the old secret to retire after its grace")
    assert "rotated" in chat(stack, secret).json()["error"]["message"]
    assert chat(stack, rotated).status_code == 200

    keys(stack, "revoke", "team-a", capsys=capsys)
    wait_for(lambda: on_every_replica(stack, lambda: chat(stack, rotated).status_code == 401),
             timeout=30, interval=0.3, what="the revocation on every replica")
    err = chat(stack, rotated).json()["error"]
    assert err["code"] == "invalid_api_key" and "revoked" in err["message"]


def test_scope_limits_and_usage_per_key(stack, capsys):
    scoped = keys(stack, "create", "--name", "scoped", "--models", "other", capsys=capsys)
    limited = keys(stack, "create", "--name", "limited", "--rpm", "4", capsys=capsys)
    wait_for(lambda: on_every_replica(stack, lambda: chat(stack, scoped).status_code == 403),
             timeout=30, interval=0.3, what="the scoped key on every replica")
    assert chat(stack, scoped).json()["error"]["code"] == "model_not_allowed"

    # Four a minute over two replicas: the shares say how many each admits; together never
    # more than the limit and its share of rounding, and the fifth in a row is refused.
    answers = [chat(stack, limited) for _ in range(8)]
    ok = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 429]
    assert 1 <= len(ok) <= 4 and refused and len(ok) + len(refused) == 8
    assert ok[0].headers["x-ratelimit-limit-requests"] == "4"
    r = refused[0]
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert r.json()["error"]["type"] == "requests"
    assert int(r.headers["retry-after"]) >= 1
    assert {"x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests"} <= set(r.headers)

    def usage():
        assert usage_command(["--by-key", "--format", "csv"], store=stack["store"]) == 0
        rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
        return {(row["key"], row["model"]): row for row in rows}

    row = wait_for(lambda: usage().get(("limited", "m")) if int(
        usage().get(("limited", "m"), {}).get("requests", 0)) == len(ok) else None,
        timeout=30, interval=0.5, what="the limited key's usage in the key store")
    assert (int(row["prompt_tokens"]), int(row["completion_tokens"])) == (5 * len(ok),
                                                                           7 * len(ok))
    assert ("scoped", "m") not in usage()  # refused requests are no usage


def test_a_replica_refuses_to_serve_the_network_without_a_key(stack, tmp_path):
    """The check every ingress replica runs before its engine loads, as Serve runs it: in a
    Ray worker, against the key actor (a fresh store: no key). Nothing is bound: the check
    comes first."""
    import ray

    from serve_app.deployments import start_keyring

    config = stack["config"].model_copy(update={"key_store_path": str(tmp_path / "empty.db")})

    @ray.remote(num_cpus=0)
    def start(config, hosts):
        try:
            asyncio.run(start_keyring(config, hosts))
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return "started"

    refused = ray.get(start.remote(config, ["0.0.0.0"]), timeout=120)
    assert refused.startswith("UnauthenticatedExposureError") and "keys create" in refused
    assert ray.get(start.remote(config, ["127.0.0.1"]), timeout=120) == "started"
    allowed = config.model_copy(update={"allow_unauthenticated": True})
    assert ray.get(start.remote(allowed, ["0.0.0.0"]), timeout=120) == "started"


def test_a_session_stays_on_one_replica_of_the_shared_port(stack, capsys):
    """Two replicas on one SO_REUSEPORT port: the kernel spreads connections, the replicas
    relay each session to the one that owns it (by X-Session-Id, or OpenAI's user field)."""
    secret = keys(stack, "create", "--name", "sessions", capsys=capsys)
    wait_for(lambda: chat(stack, secret).status_code == 200, timeout=30, interval=0.3,
             what="the key")

    def served_by(**kw):
        headers = {"Authorization": f"Bearer {secret}", **kw.pop("headers", {})}
        resp = httpx.post(f"{stack['url']}/v1/chat/completions", json={**CHAT, **kw},
                          headers=headers, timeout=30)
        assert resp.status_code == 200, resp.text
        return resp.json()["pid"]

    # Without a session the kernel's choice stands: both replicas answer.
    wait_for(lambda: len({served_by() for _ in range(20)}) == 2, timeout=60, interval=0.5,
             what="both replicas answering")
    # Each replica learns its sibling's private port within a round.
    wait_for(lambda: all(len({served_by(headers={"X-Session-Id": f"conv-{i}"})
                              for _ in range(8)}) == 1 for i in range(4)),
             timeout=60, interval=0.5, what="every session on one replica")
    owners = {served_by(headers={"X-Session-Id": f"conv-{i}"}) for i in range(24)}
    assert len(owners) == 2  # sessions are spread over the replicas
    assert len({served_by(user="alice") for _ in range(8)}) == 1


def test_key_names_and_usage_per_key_never_reach_the_license_server(stack, capsys):
    """The usage reports stay content-free and key-free: a key named with a canary, used on
    both replicas, is in the key store's usage and nowhere on the license server's wire."""
    import ray

    canary = f"canary-{os.urandom(8).hex()}"
    secret = keys(stack, "create", "--name", canary, capsys=capsys)
    public_id = secret[: len("sak_") + 12]
    server = stack["server"]
    wait_for(lambda: on_every_replica(stack, lambda: chat(stack, secret).status_code == 200),
             timeout=30, interval=0.3, what="the canary key on every replica")
    start = len(server.received)
    for _ in range(6):
        assert chat(stack, secret).status_code == 200
    wait_for(lambda: sum(b"/v1/usage" in c for c in server.received[start:]) >= 2,
             timeout=30, what="usage reports after the canary's requests")
    license = stack["config"].license
    actor = ray.get_actor(license.actor_name, namespace=license.namespace)
    assert ray.get(actor.flush.remote(), timeout=30)["pending_seconds"] == 0

    def in_store():
        assert usage_command(["--format", "csv"], store=stack["store"]) == 0
        return canary in capsys.readouterr().out

    wait_for(in_store, timeout=30, what="the canary key's usage in the key store")
    for chunk in server.received:
        for secret_part in (canary.encode(), secret.encode(), public_id.encode()):
            assert secret_part not in chunk
