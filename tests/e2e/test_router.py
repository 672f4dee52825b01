"""The router layout (colocate_ingress=false) served by real vLLM: a chat and a stream through
Serve's proxy and the router replica's hop to the engine, the license counting the engine's
replica only, and the privacy canary through every route of this layout too."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL
from tests.e2e.privacy import assert_no_canary_reaches_the_license_server

pytestmark = pytest.mark.e2e

QUESTION = "What is the capital of France?"


def test_the_router_sits_in_front_of_the_engine(router_stack):
    import ray

    replicas = {a["name"].split("#")[1] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::serve_app#")}
    assert replicas == {"Ingress", f"LLM:{MODEL}"}
    status = httpx.get(f"{router_stack.url}/license", timeout=30).json()
    assert status["state"] == "ok" and status["instances_now"] == 1  # the router is not one


def test_a_chat_through_serves_proxy(router_stack):
    client = openai.OpenAI(base_url=f"{router_stack.url}/v1", api_key="unused", max_retries=0)
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], temperature=0,
        max_tokens=30)
    choice = resp.choices[0]
    assert "Paris" in choice.message.content and choice.finish_reason == "stop"
    assert 0 < resp.usage.completion_tokens <= 30


def test_a_stream_crosses_the_hop_whole_and_framed(router_stack):
    body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}],
            "temperature": 0, "max_tokens": 30, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{router_stack.url}/v1/chat/completions", json=body,
                      timeout=120) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert "Paris" in text
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] >= 5


def test_privacy_canary_never_reaches_the_license_server(router_stack):
    assert_no_canary_reaches_the_license_server(router_stack)
