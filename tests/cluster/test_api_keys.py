"""Tenants on a multi-node cluster: the key actor on the head (where the store's file is), an
ingress replica on a GPU worker node, a key created, rotated and revoked on the head reaching
that replica within seconds, through the front door; and the front door keeping each session on
one replica."""

from __future__ import annotations

import contextlib
import io

import httpx
import pytest

from tests.cluster.conftest import CHAT
from tests.conftest import wait_for

pytestmark = pytest.mark.cluster


def test_a_key_change_on_the_head_reaches_a_replica_on_another_node(fake_cluster, tmp_path):
    import ray
    from ray import serve

    from serve_app.builder import build_app_from_config
    from serve_app.config import AppConfig, ModelConfig
    from serve_app.tenants import get_key_actor, keys_command
    from tests.cluster.standins import NodeLLM

    store = str(tmp_path / "api_keys.db")
    model = ModelConfig(name="m", device="gpu", accelerator_type="L4", min_replicas=1,
                        max_replicas=1)
    config = AppConfig(models=(model,), http_port=None, key_store_path=store)
    serve.run(build_app_from_config(config, llm_cls=NodeLLM), name="keys",
              route_prefix="/keys", blocking=False)
    url = f"{fake_cluster.front_door}/keys/v1/chat/completions"

    def post(secret=None):
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        return httpx.post(url, json=CHAT, headers=headers, timeout=30)

    def create(*argv):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert keys_command(list(argv), store=store) == 0
        return buf.getvalue().strip()

    try:
        # The front door binds loopback and no key exists yet: open.
        wait_for(lambda: post().status_code == 200, timeout=240, interval=1,
                 what="the keyed app on a GPU node, through the front door")
        served_on = post().json()["node_id"]
        assert fake_cluster.node_type(served_on) == "gpu_l4"
        info = ray.get(get_key_actor(store).info.remote(), timeout=30)
        assert info["node_id"] == fake_cluster.head_id() and len(info["replicas"]) == 1

        secret = create("create", "--name", "team-a")
        wait_for(lambda: post(secret).status_code == 200 and post().status_code == 401,
                 timeout=30, interval=0.3, what="the key created on the head, on the worker")
        assert post(secret).json()["node_id"] == served_on

        rotated = create("rotate", "team-a", "--grace", "0")
        wait_for(lambda: post(rotated).status_code == 200 and post(secret).status_code == 401,
                 timeout=30, interval=0.3, what="the rotation on the worker")
        create("revoke", "team-a")
        wait_for(lambda: post(rotated).status_code == 401, timeout=30, interval=0.3,
                 what="the revocation on the worker")
        assert "revoked" in post(rotated).json()["error"]["message"]
    finally:
        serve.delete("keys")


def test_the_front_door_keeps_a_session_on_one_replica(fake_cluster):
    """Serve's HAProxy on the head, with the clusters' balance switch: one X-Session-Id, one
    replica, whatever connection it comes on; different sessions spread over the replicas;
    requests without one are spread too."""
    from ray import serve

    from serve_app.builder import build_app_from_config
    from serve_app.config import AppConfig, ModelConfig
    from tests.cluster.standins import NodeLLM

    model = ModelConfig(name="m", device="cpu", min_replicas=2, max_replicas=2)
    config = AppConfig(models=(model,), http_port=None)
    serve.run(build_app_from_config(config, llm_cls=NodeLLM), name="sessions",
              route_prefix="/sessions", blocking=False)
    url = f"{fake_cluster.front_door}/sessions/v1/chat/completions"

    def replica(session=None):
        headers = {"X-Session-Id": session} if session else {}
        resp = httpx.post(url, json=CHAT, headers=headers, timeout=30)  # a connection each
        assert resp.status_code == 200, resp.text
        return resp.json()["replica"]

    try:
        wait_for(lambda: len({replica() for _ in range(10)}) == 2, timeout=240, interval=1,
                 what="both replicas behind the front door")
        for i in range(6):
            assert len({replica(f"conv-{i}") for _ in range(6)}) == 1, f"conv-{i}"
        assert len({replica(f"conv-{i}") for i in range(12)}) == 2
    finally:
        serve.delete("sessions")
