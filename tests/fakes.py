"""Fakes with the same protocol as the real classes they stand in for.

``FakeLLMHandle`` mimics a Serve ``DeploymentHandle`` to the LLM deployment: ``options(...)``
returns a handle bound to one method, ``.remote(...)`` returns an awaitable (unary) or an async
iterator with ``cancel()`` (streaming), exactly what ``ingress.py`` uses.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any


class FakeStream:
    def __init__(
        self,
        items: list[Any],
        *,
        delay: float = 0.0,
        fail_after: int | None = None,
        error: Exception | None = None,
    ) -> None:
        self._items = list(items)
        self._delay = delay
        self._fail_after = fail_after
        self._error = error or RuntimeError("replica blew up")
        self._sent = 0
        self.cancelled = False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> Any:
        if self._fail_after is not None and self._sent >= self._fail_after:
            raise self._error
        if not self._items:
            raise StopAsyncIteration
        if self._delay and self._sent:
            await asyncio.sleep(self._delay)
        self._sent += 1
        return self._items.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


class FakeLLMServer:
    """Scripted replica behaviour, recorded calls."""

    def __init__(self, name: str = "m") -> None:
        self.name = name
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.streams: list[FakeStream] = []
        self.stream_delay = 0.0
        self.raise_on_call: Exception | None = None
        self.ready_calls = 0

    async def openai(self, endpoint: str, body: bytes) -> tuple[int, str]:
        self.calls.append(("openai", (endpoint, body)))
        if self.raise_on_call:
            raise self.raise_on_call
        return 200, json.dumps({"object": endpoint, "echo": json.loads(body)})

    def openai_stream(self, endpoint: str, body: bytes) -> FakeStream:
        self.calls.append(("openai_stream", (endpoint, body)))
        items: list[Any] = [(200, "data: {\"n\": 0}\n\n")]
        items += [f"data: {{\"n\": {i}}}\n\n" for i in range(1, 4)] + ["data: [DONE]\n\n"]
        stream = FakeStream(items, delay=self.stream_delay)
        self.streams.append(stream)
        return stream

    async def maritalk(self, kind: str, body: bytes) -> tuple[int, str]:
        self.calls.append(("maritalk", (kind, body)))
        return 200, json.dumps({"output": "Paris", "queue_time": 0.0, "prompt_time": 0.1,
                                "generation_time": 0.2})

    async def ready(self) -> str:
        self.ready_calls += 1
        return self.name

    async def metrics_text(self) -> str:
        return f'serve_app_engine_unfinished_requests{{model_name="{self.name}"}} 0\n'


class _Call:
    def __init__(self, server: FakeLLMServer, method: str) -> None:
        self._server = server
        self._method = method

    def remote(self, *args: Any) -> Any:
        server = self._server
        if server.raise_on_call is not None and self._method == "openai_stream":
            return FakeStream([], fail_after=0, error=server.raise_on_call)
        result = getattr(server, self._method)(*args)
        return result


class FakeLLMHandle:
    def __init__(self, server: FakeLLMServer, method: str | None = None) -> None:
        self.server = server
        self._method = method

    def options(self, *, method_name: str | None = None, stream: bool = False) -> FakeLLMHandle:
        return FakeLLMHandle(self.server, method_name or self._method)

    def remote(self, *args: Any) -> Any:
        assert self._method is not None
        return _Call(self.server, self._method).remote(*args)

    def __getattr__(self, name: str) -> _Call:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Call(self.server, name)


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in stream]
