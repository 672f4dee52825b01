"""The LLM stand-in for GPU-typed replicas on fake GPU nodes (vLLM cannot start without a GPU).

It registers and heartbeats with the license actor exactly as ``LLMServer`` does, and tells
every response which node, instance and replica served it, so tests see where the front door sent each
request. Imported by Ray workers on every node (the cluster's PYTHONPATH holds this checkout).
"""

from __future__ import annotations

import asyncio
import json

from tests.fakes import FakeLLMServer


class NodeLLM(FakeLLMServer):
    """Same methods as ``LLMServer``. A chat request's ``max_tokens`` is how many 0.1 s chunks
    its stream lasts (load that Serve's autoscaler sees as in-flight requests)."""

    async def __init__(self, config, model_cache_dir, license=None):
        import ray

        super().__init__(config.name)
        self._reporter = None
        from ray import serve

        self.node_id = ray.get_runtime_context().get_node_id()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.instance_id = None
        if license is not None:
            from serve_app.licensing.gate import InstanceReporter
            from serve_app.licensing.placement import get_license_actor

            gpus = float(config.tensor_parallel_size) if config.device == "gpu" else 0.0
            self._reporter = InstanceReporter(get_license_actor(license), config.name, gpus)
            # Raises (and the replica does not start) when the license refuses it.
            await self._reporter.start()
            self.instance_id = self._reporter.instance_id

    def _where(self) -> dict:
        return {"node_id": self.node_id, "instance_id": self.instance_id,
                "replica": self.replica}

    async def openai(self, endpoint, body):
        return 200, json.dumps({"object": endpoint, **self._where()})

    async def openai_stream(self, endpoint, body):
        chunks = int(json.loads(body).get("max_tokens") or 3)
        yield 200, f"data: {json.dumps(self._where())}\n\n"
        for i in range(chunks):
            await asyncio.sleep(0.1)
            yield f'data: {{"n": {i}}}\n\n'
        yield "data: [DONE]\n\n"

    async def check_health(self):
        return None

    def __del__(self):
        if self._reporter is not None:
            self._reporter.stop()
