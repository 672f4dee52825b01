"""The LLM stand-in for GPU-typed replicas on fake GPU nodes (vLLM cannot start without a GPU).

``LLMServer`` itself: Serve constructs it, awaits its ``start()``, and it registers and
heartbeats with the license actor exactly as a real replica does. Only what it loads differs: no
engine, but answers that tell which node, instance and replica served them, so tests see where
the front door sent each request. Imported by Ray workers on every node (the cluster's
PYTHONPATH holds this checkout).
"""

from __future__ import annotations

import asyncio
import json

from serve_app.llm_server import LLMServer


class NodeLLM(LLMServer):
    """A chat request's ``max_tokens`` is how many 0.1 s chunks its stream lasts (load that
    Serve's autoscaler sees as in-flight requests)."""

    async def load(self) -> None:
        import ray
        from ray import serve

        self.node_id = ray.get_runtime_context().get_node_id()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.instance_id = self._reporter.instance_id if self._reporter is not None else None

    def _where(self) -> dict:
        return {"node_id": self.node_id, "instance_id": self.instance_id,
                "replica": self.replica}

    async def openai(self, endpoint, body):
        return 200, json.dumps({"object": endpoint, **self._where()})

    async def openai_stream(self, endpoint, body):
        chunks = int(json.loads(body).get("max_tokens") or 3)
        yield 200, f"data: {json.dumps(self._where())}\n\n"
        for i in range(chunks):
            await asyncio.sleep(0.1)  # the stand-in's generation time
            yield f'data: {{"n": {i}}}\n\n'
        yield "data: [DONE]\n\n"

    async def check_health(self) -> None:
        return None

    async def metrics_text(self) -> str:
        return ""
