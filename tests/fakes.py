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


class ParsingLLMServer(FakeLLMServer):
    """A replica that refuses what ``LLMServer`` refuses before its engine runs: the OpenAI body
    through vLLM's own request model and its ``to_sampling_params``, the MariTalk body through
    ours and vLLM's ``SamplingParams``. Generates nothing; answers with the sampling values.

    vLLM's classes are passed in, so only the tests that want them import vLLM."""

    def __init__(self, name: str, request_models: dict[str, Any], sampling_params: Any) -> None:
        super().__init__(name)
        self._request_models = request_models
        self._sampling_params = sampling_params

    def _check_openai(self, endpoint: str, body: bytes) -> tuple[int, str] | None:
        from serve_app.validation import request_error_body

        try:
            request = self._request_models[endpoint].model_validate_json(body)
            request.to_sampling_params(16, {})
        except Exception as exc:
            return 400, json.dumps(request_error_body(exc))
        return None

    async def openai(self, endpoint: str, body: bytes) -> tuple[int, str]:
        refused = self._check_openai(endpoint, body)
        if refused is not None:
            self.calls.append(("openai", (endpoint, body)))
            return refused
        return await super().openai(endpoint, body)

    def openai_stream(self, endpoint: str, body: bytes) -> FakeStream:
        refused = self._check_openai(endpoint, body)
        if refused is not None:
            self.calls.append(("openai_stream", (endpoint, body)))
            return FakeStream([refused])
        return super().openai_stream(endpoint, body)

    async def maritalk(self, kind: str, body: bytes) -> tuple[int, str]:
        from serve_app.maritalk import ChatGenerateRequest, GenerateRequest
        from serve_app.validation import request_error_body

        self.calls.append(("maritalk", (kind, body)))
        model = ChatGenerateRequest if kind == "chat" else GenerateRequest
        try:
            params = model.model_validate_json(body)
            sampling = self._sampling_params(**params.sampling_kwargs())
        except Exception as exc:
            return 400, json.dumps(request_error_body(exc))
        return 200, json.dumps({
            "output": "Paris", "queue_time": 0.0, "prompt_time": 0.1, "generation_time": 0.2,
            "prompt_tokens": 3, "completion_tokens": 1, "finish_reason": "stop",
            "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p,
                         "max_tokens": sampling.max_tokens, "seed": sampling.seed,
                         "stop": sampling.stop},
        })
