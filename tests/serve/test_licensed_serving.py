"""Ray Serve in-process with the real license actor and a real license server on loopback; the
LLM deployment is a stand-in (no vLLM) so faults can be injected quickly. Each fault test
compares ledger and server totals before and after."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest

from serve_app.config import RAY_SERVE_ENV, TELEMETRY_OFF_ENV, AppConfig, ModelConfig
from serve_app.llm_server import LLMServer
from tests.conftest import LicenseServerProcess, free_port, ledger_instances, wait_for
from tests.fakes import FakeLLMServer

pytestmark = pytest.mark.serve

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
INTERVAL = 1.0


class LicensedFakeLLM(LLMServer):
    """``LLMServer`` itself, license registration and heartbeats included; what it loads is a
    scripted replica (``FakeLLMServer``'s answers, slow streams) instead of a vLLM engine."""

    async def load(self):
        self._fake = FakeLLMServer(self._config.name)

    async def openai(self, endpoint, body):
        return await self._fake.openai(endpoint, body)

    async def openai_stream(self, endpoint, body):
        yield 200, 'data: {"n": 0}\n\n'
        for i in range(1, 30):
            await asyncio.sleep(0.1)
            yield f'data: {{"n": {i}}}\n\n'
        yield "data: [DONE]\n\n"

    async def maritalk(self, kind, body):
        return await self._fake.maritalk(kind, body)

    async def check_health(self):
        pass

    async def metrics_text(self):
        return await self._fake.metrics_text()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray import serve

    from serve_app.builder import build_app_from_config

    for key, value in RAY_SERVE_ENV.items():
        os.environ.setdefault(key, value)
    data = tmp_path_factory.mktemp("licensing")
    server = LicenseServerProcess(data / "server").start()
    lic, key = server.issue(heartbeat_interval_s=INTERVAL, grace_period_s=3600)
    license = server.license_config(key, data / "ledger.db", report_interval_s=1.0,
                                    actor_name=f"license_{os.getpid()}")
    # The replicas listen on `port` themselves; Serve's proxy (for the router layout) on its own.
    port, serve_port = free_port(), free_port()
    config = AppConfig(models=(ModelConfig(name="m", device="cpu"),), license=license,
                       http_port=port)
    # "local": a cluster of its own even when another one runs on this machine.
    ray.init(address="local", include_dashboard=False, num_cpus=4,
             runtime_env={"env_vars": dict(TELEMETRY_OFF_ENV)})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
        serve.run(build_app_from_config(config, llm_cls=LicensedFakeLLM), name="licensed",
                  route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.post(f"{url}/v1/chat/completions", json=CHAT).status_code == 200,
                 timeout=120, what="the licensed app")
        actor = ray.get_actor(license.actor_name, namespace=license.namespace)
        yield {"url": url, "serve_url": f"http://127.0.0.1:{serve_port}", "port": port,
               "server": server, "license": lic, "actor": actor, "config": config}
    finally:
        serve.shutdown()
        ray.shutdown()
        server.stop()


def totals(cluster):
    """(ledger total, server total) after delivering everything now; the ledger's total leaves
    out reports the server refused (quarantined)."""
    import ray

    ledger = ray.get(cluster["actor"].flush.remote(), timeout=30)
    assert ledger["pending_seconds"] == 0
    server = cluster["server"].service.store.total_instance_seconds(cluster["license"].license_id)
    return ledger["instance_seconds"] - ledger["quarantined_seconds"], server


def status(cluster):
    return httpx.get(f"{cluster['url']}/license", timeout=10).json()


def listeners(port):
    """Processes listening on ``port`` (replicas share it with SO_REUSEPORT)."""
    import psutil

    return sorted(c.pid for c in psutil.net_connections(kind="tcp")
                  if c.status == psutil.CONN_LISTEN and c.laddr.port == port)


def test_serves_counts_and_reports(cluster):
    st = status(cluster)
    assert (st["license_id"], st["customer"], st["state"]) == (cluster["license"].license_id,
                                                               "ACME", "ok")
    assert st["instances_now"] == 1
    assert st["grace_left_s"] > 3500
    wait_for(lambda: totals(cluster)[0] > 0, timeout=30, what="usage in the ledger")
    ledger, server = totals(cluster)
    assert ledger > 0 and server == pytest.approx(ledger)
    assert cluster["server"].service.store.active_instances(cluster["license"].license_id,
                                                            fresh_s=10) == 1


def test_the_replica_serves_its_own_port_and_serves_through_serve_too(cluster):
    assert len(listeners(cluster["port"])) == 1
    # The same app (same admission, same license gate) behind Serve's proxy and direct ingress.
    resp = httpx.post(f"{cluster['serve_url']}/v1/chat/completions", json=CHAT, timeout=30)
    assert resp.status_code == 200
    with httpx.stream("POST", f"{cluster['url']}/v1/chat/completions",
                      json={**CHAT, "stream": True}, timeout=60) as stream:
        lines = [line for line in stream.iter_lines() if line]
    assert lines[0] == 'data: {"n": 0}' and lines[-1] == "data: [DONE]" and len(lines) == 31


def test_killing_the_actor_loses_and_doubles_nothing(cluster):
    import ray

    path = cluster["config"].license.ledger_path

    def counted() -> list[str] | None:
        live = [i for i, row in ledger_instances(path).items() if row["stopped"] == 0]
        return live if len(live) == 1 else None

    (instance,) = wait_for(counted, timeout=60, what="exactly one counted replica")
    before = ledger_instances(path)[instance]
    ray.kill(cluster["actor"], no_restart=False)
    wait_for(lambda: ray.get(cluster["actor"].status.remote(), timeout=5)["instances_now"] == 1,
             timeout=60, what="the restarted actor")
    restarted = time.time()
    assert httpx.post(f"{cluster['url']}/v1/chat/completions", json=CHAT).status_code == 200
    # The replica's next heartbeat to the new actor bills the outage.
    wait_for(lambda: ledger_instances(path)[instance]["last_seen"] > restarted, timeout=30,
             interval=0.2, what="a heartbeat to the restarted actor")
    after, server = totals(cluster)
    assert server == pytest.approx(after)
    row = ledger_instances(path)[instance]
    assert row["registered_at"] == before["registered_at"]  # the same instance, carried on
    # Every second from its registration to its last heartbeat is billed, the outage
    # included, and none twice.
    assert row["seconds"] == pytest.approx(row["last_seen"] - row["registered_at"], abs=1e-3)


def test_killing_a_replica_stops_its_count_and_the_new_one_counts(cluster):
    import ray

    before, _ = totals(cluster)
    first = status(cluster)
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "SERVE_REPLICA" in a["name"] and "LLM" in a["name"]]
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]),
             no_restart=True)
    wait_for(lambda: httpx.post(f"{cluster['url']}/v1/chat/completions",
                                json=CHAT).status_code == 200, timeout=60, what="a new replica")
    wait_for(lambda: status(cluster)["instances_now"] == 1 and
             status(cluster)["instance_seconds_total"] > first["instance_seconds_total"],
             timeout=30, what="the dead replica to expire")
    after, server = totals(cluster)
    assert server == pytest.approx(after) and after > before


def test_license_server_restart_loses_nothing(cluster):
    server = cluster["server"]
    before, _ = totals(cluster)
    server.stop()
    try:
        # Grace: still serving while the server is down, still accruing locally.
        wait_for(lambda: status(cluster)["seconds_pending_delivery"] > 0, timeout=30,
                 interval=0.2, what="usage accrued while the server is down")
        assert httpx.post(f"{cluster['url']}/v1/chat/completions", json=CHAT).status_code == 200
    finally:
        server.start()
    after, delivered = totals(cluster)
    assert delivered == pytest.approx(after) and after > before


def test_scaling_up_and_down_shows_in_the_count(cluster):
    """Serve changing the replica count (what autoscaling does) is what the actor counts."""
    from ray import serve

    from serve_app.builder import build_app_from_config

    def scale(n):
        config = cluster["config"]
        model = config.models[0].model_copy(update={"min_replicas": n, "max_replicas": n})
        serve.run(build_app_from_config(config.model_copy(update={"models": (model,)}),
                                        llm_cls=LicensedFakeLLM),
                  name="licensed", route_prefix="/", blocking=False)

    scale(2)
    wait_for(lambda: status(cluster)["instances_now"] == 2, timeout=60, what="two instances")
    # The server counts what heartbeated within fresh_s: the replica test_c killed may still be
    # in that window (replicas now drain in 2 s, so tests follow each other quickly).
    wait_for(lambda: cluster["server"].service.store.active_instances(
        cluster["license"].license_id, fresh_s=10) == 2, timeout=20, what="the server's count")
    # Both replicas listen on the one port (SO_REUSEPORT); the kernel spreads connections.
    wait_for(lambda: len(listeners(cluster["port"])) == 2, timeout=30, what="two listeners")

    async def streams(n):
        started = asyncio.Semaphore(0)

        async def one():
            async with httpx.AsyncClient(timeout=60) as client:  # a connection each
                async with client.stream("POST", f"{cluster['url']}/v1/chat/completions",
                                         json={**CHAT, "stream": True}) as resp:
                    lines = []
                    async for line in resp.aiter_lines():
                        if line and not lines:
                            started.release()
                        if line:
                            lines.append(line)
                    return lines

        tasks = [asyncio.create_task(one()) for _ in range(n)]
        for _ in range(n):  # every stream has its first event
            await asyncio.wait_for(started.acquire(), timeout=30)
        await asyncio.to_thread(scale, 1)  # the replica going away stops accepting and finishes its streams
        return await asyncio.gather(*tasks)

    for lines in asyncio.run(streams(6)):
        assert lines[-1] == "data: [DONE]" and len(lines) == 31
    wait_for(lambda: status(cluster)["instances_now"] == 1, timeout=60, what="one instance")
    wait_for(lambda: len(listeners(cluster["port"])) == 1, timeout=30, what="one listener")
    ledger, server = totals(cluster)
    assert server == pytest.approx(ledger)


def test_a_refused_report_is_quarantined_and_the_reports_after_it_are_billed(cluster):
    """A sealed report the server refuses (an instance id over its 128-character limit) steps
    aside with the server's reason; the ledger then matches the server minus exactly that
    report, and the customer's usage log matches the server's usage per day."""
    import sqlite3
    import uuid

    from serve_app.cli import usage_log_command
    from serve_app.licensing.ledger import UsageLedger

    lic = cluster["license"]
    path = cluster["config"].license.ledger_path
    st = status(cluster)
    before_q = st["quarantined_seconds"]
    now = time.time()
    report_id = f"rep_{uuid.uuid4().hex}"
    with sqlite3.connect(path, timeout=30) as db:
        db.execute("INSERT INTO reports(report_id, created_at, license_id) VALUES (?, ?, ?)",
                   (report_id, now, lic.license_id))
        db.execute('INSERT INTO intervals(instance_id, start, "end", gpus, report_id) '
                   "VALUES (?, ?, ?, 0, ?)", ("x" * 200, now - 30, now - 20, report_id))
    wait_for(lambda: any(q["report_id"] == report_id for q in status(cluster)["quarantined"]),
             timeout=30, interval=0.2, what="the refused report to be quarantined")
    # Reports sealed after it keep arriving.
    delivered = status(cluster)["last_report_at"]
    wait_for(lambda: status(cluster)["last_report_at"] > delivered, timeout=30, interval=0.2,
             what="a report after the refused one")
    ledger, server = totals(cluster)
    assert server == pytest.approx(ledger)
    st = status(cluster)
    assert st["quarantined_seconds"] - before_q == pytest.approx(10.0)
    # The license's usage in status: billed, quarantined, and what accrued since the flush.
    assert st["instance_seconds_total"] - st["quarantined_seconds"] >= server - 0.001
    (refused,) = [q for q in st["quarantined"] if q["report_id"] == report_id]
    assert refused["reason"].startswith("HTTP 400: intervals.0.instance_id: ")
    # Re-sent, the same report is refused the same way and counted nowhere.
    assert usage_log_command(["--ledger", path, "resend", "--wait", "30", report_id]) == 1
    ledger, server = totals(cluster)
    assert server == pytest.approx(ledger)

    def log_matches_server():
        led = UsageLedger(path).start()
        try:
            check = led.verify_log()
        finally:
            led.close()
        assert check.ok, check.problems
        mine = {r["day"]: r["instance_seconds"] for r in check.days}
        theirs = {r["day"]: r["instance_seconds"]
                  for r in cluster["server"].service.usage(lic.license_id)["usage"]}
        return mine.keys() == theirs.keys() and all(
            abs(mine[d] - theirs[d]) <= 0.002 for d in mine)

    # A report may land between reading the two; they agree once it has.
    wait_for(log_matches_server, timeout=30, interval=0.3, what="the usage log to match")


def test_router_layout_serves_streams_and_counts(cluster):
    """``colocate_ingress=false``: a router replica in front, the model behind a handle."""
    import ray
    from ray import serve

    from serve_app.builder import build_app_from_config

    def deploy(colocate):
        config = cluster["config"].model_copy(update={
            "colocate_ingress": colocate, "http_port": cluster["port"] if colocate else None})
        serve.run(build_app_from_config(config, llm_cls=LicensedFakeLLM), name="licensed",
                  route_prefix="/", blocking=False)

    def deployments():
        return {a["name"].split("#")[1] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::licensed#")}

    url = cluster["serve_url"]  # the router layout has no replica listener
    deploy(False)
    try:
        wait_for(lambda: deployments() == {"Ingress", "LLM:m"}, timeout=60,
                 what="the router layout")
        wait_for(lambda: httpx.post(f"{url}/v1/chat/completions", json=CHAT).status_code == 200,
                 timeout=60, what="the router layout to serve")
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**CHAT, "stream": True},
                          timeout=60) as stream:
            lines = [line for line in stream.iter_lines() if line]
        assert lines[0] == 'data: {"n": 0}' and lines[-1] == "data: [DONE]"
        assert len(lines) == 31
        wait_for(lambda: httpx.get(f"{url}/license", timeout=10).json()["instances_now"] == 1,
                 timeout=30, what="one counted instance (the router is not one)")
    finally:
        deploy(True)
        wait_for(lambda: deployments() == {"LLM:m"}, timeout=60, what="the colocated layout")
        wait_for(lambda: httpx.post(f"{url}/v1/chat/completions", json=CHAT).status_code == 200,
                 timeout=60, what="the colocated layout to serve")


def test_revocation_refuses_new_requests_but_finishes_running_ones(cluster):
    url = cluster["url"]
    try:
        _revoke_while_streaming(cluster, url)
    finally:  # reinstate the license: the other tests run on it, in any order
        store = cluster["server"].service.store
        from license_server.db import licenses

        with store.engine.begin() as conn:
            conn.execute(licenses.update()
                         .where(licenses.c.license_id == cluster["license"].license_id)
                         .values(revoked_at=None))
        wait_for(lambda: status(cluster)["state"] == "ok", timeout=30, interval=0.2,
                 what="the reinstated license")


def _revoke_while_streaming(cluster, url):
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**CHAT, "stream": True},
                      timeout=60) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        cluster["server"].service.store.revoke(cluster["license"].license_id)

        def refused():
            resp = httpx.post(f"{url}/v1/chat/completions", json=CHAT)
            return resp.status_code == 403 and resp.json()["error"]["code"] == "license_revoked"

        wait_for(refused, timeout=20, interval=0.2, what="revocation to take effect")
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"  # the running stream was not cut
    assert status(cluster)["state"] == "license_revoked"
    resp = httpx.post(f"{url}/generate", json={"prompt": "x"})
    assert resp.status_code == 403
    assert resp.json()["error"]["type"] == "license_error"
