"""The LLM deployment: one vLLM ``AsyncLLM`` per replica, served through vLLM's own OpenAI layer.

vLLM is reached only through ``vllm_internals`` (the one module that imports it). Methods take
the raw request body (bytes, cheap to ship across the Ray hop) and return ``(status,
json_text)``; streaming methods yield ``(status, text)`` first and then plain SSE text,
coalesced (see ``streaming.py``). Expected failures are values, never exceptions, so a bad
request cannot hurt the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from serve_app import vllm_internals as vllm
from serve_app.affinity import (
    cpu_count,
    engine_launch,
    pin_to_frontend,
    reserved_cores,
    single_worker,
)
from serve_app.config import ModelConfig
from serve_app.errors import error_body, from_vllm_error
from serve_app.kernels import bf16_weights
from serve_app.licensing import LicenseConfig
from serve_app.maritalk import ChatGenerateRequest, GenerateRequest, GenerateResponse, timings
from serve_app.process_guard import guard_children
from serve_app.streaming import PacedEngine, coalesce
from serve_app.validation import request_error_body
from serve_app.weights import (
    WeightsError,
    claimed_identity,
    confirmed_identity,
    resolve_model,
    weight_bytes,
)

logger = logging.getLogger("ray.serve")

Result = tuple[int, str]
# (the model's config with its device decided, vLLM's config) -> an engine client, or an
# awaitable of one; ``launch_engine`` is the real one, tests pass stand-ins.
EngineFactory = Callable[[ModelConfig, Any], Any]


def launch_engine(config: ModelConfig, vllm_config: Any) -> Any:
    """The default engine factory: vLLM's ``AsyncLLM`` for ``vllm_config``, started with this
    app's CPU placement (``affinity.py``) when ``config.device`` is ``cpu``."""
    cpu = config.device == "cpu"
    inproc = cpu and config.cpu_inproc_worker and single_worker(
        vllm.world_size(vllm_config), config.engine_kwargs
    )
    if inproc:
        vllm.run_worker_in_engine_core(vllm_config)
    with contextlib.ExitStack() as launch:
        if cpu:
            weights = weight_bytes(vllm.model_path(vllm_config))
            launch.enter_context(engine_launch(
                reserved_cores(config.cpu_reserved_cores, cpu_count(), weights)))
        if inproc:
            launch.enter_context(vllm.worker_omp_env(vllm_config))
        launch.enter_context(bf16_weights.in_engine(config.bf16_weight_decode))
        engine = vllm.start_engine(vllm_config)
    if cpu:
        pin_to_frontend()  # off the engine's cores (or onto one shared core, no reserve)
    return engine


class LLMServer:
    """One vLLM engine. Serve constructs it on a GPU (or, on CPU boxes, with ``num_cpus: 0``)
    and awaits ``start()`` before the replica serves (``deployments.started``).

    The constructor only stores. ``engine_factory(config, vllm_config)`` makes the engine
    client (default ``launch_engine``; it may return an awaitable): anything with the surface
    of vLLM's ``AsyncLLM`` that this class and vLLM's OpenAI layer use. ``license_actor``
    finds the license actor (default ``license_actor.get_license_actor``)."""

    # Streams cross a Ray hop to the router ingress; ``ColocatedIngress`` turns this off.
    _coalesce_streams = True

    def __init__(
        self,
        config: ModelConfig,
        model_cache_dir: str,
        license: LicenseConfig | None = None,
        *,
        engine_factory: EngineFactory | None = None,
        license_actor: Callable[[LicenseConfig], Any] | None = None,
    ) -> None:
        self._config = config
        self._model_cache_dir = model_cache_dir
        self._license = license
        self._engine_factory = engine_factory or launch_engine
        self._license_actor = license_actor
        self._reporter: Any = None
        self._engine: Any = None
        self._identity = config.name  # the model's identity, decided in start()

    async def start(self) -> None:
        """Register with the license under the model's identity, then fetch and load the model
        (which confirms the identity) and start the engine."""
        # `auto` becomes this node's device here, where the replica runs.
        self._config = self._config.model_copy(update={"device": self._config.local_device()})
        config = self._config
        # Decided before anything is fetched, so that a license that does not cover the model
        # refuses it before any byte of the weights moves.
        self._identity = await asyncio.to_thread(claimed_identity, config.source, config.name,
                                                 self._license)
        await self.register()
        await self.load()

    async def register(self) -> None:
        """Before loading anything: a replica of a model the license does not cover, or past
        the license's cap, must not start. The license judges the model's identity, not the
        name it is served under."""
        if self._license is None:
            return
        from serve_app.licensing import InstanceReporter, get_license_actor

        config = self._config
        actor = (self._license_actor or get_license_actor)(self._license)
        gpus = float(config.tensor_parallel_size) if config.device == "gpu" else 0.0
        self._reporter = InstanceReporter(actor, self._identity, gpus)
        await self._reporter.start()

    async def load(self) -> None:
        """Fetch the model, start the engine and vLLM's OpenAI layer over it."""
        config = self._config
        gaps = vllm.missing()
        if gaps:  # only on a release other than the pinned one (allow_unpinned_versions)
            logger.error("This vLLM lacks internals the app relies on; affected features may "
                         "fail or quietly stop working: %s", "; ".join(gaps))
        path = await asyncio.to_thread(resolve_model, config.source, self._model_cache_dir,
                                       s3=config.s3_options(), license=self._license,
                                       cluster_id=self._reporter.cluster_id if self._reporter else None)
        fetched = await asyncio.to_thread(confirmed_identity, config.source, path, config.name,
                                          self._license)
        if fetched != self._identity:
            raise WeightsError(f"{path} holds model {fetched!r}, not the {self._identity!r} this "
                               "replica registered with the license under: not serving it.")
        engine_args, vllm_config = vllm.engine_config(config.engine_args(str(path)))
        engine = self._engine_factory(config, vllm_config)
        if inspect.isawaitable(engine):
            engine = await engine
        self._engine = engine
        # The engine core must not outlive this replica, however the replica ends.
        self._engine_guard = guard_children()
        layer = await vllm.openai_layer(
            engine, vllm.frontend_namespace(vars(engine_args), config.frontend_args()))
        if config.stream_interval_ms > 0:
            # Pacing the layer's reads lets vLLM merge tokens before they become SSE events.
            layer.pace(PacedEngine(engine, config.stream_interval_ms / 1000))
        self._handlers = layer.handlers()
        self._tokenizer = engine.get_tokenizer()
        self._max_model_len = vllm.max_model_len(vllm_config)
        logger.info("LLM replica ready: %s from %s", config.name, path)

    # -- OpenAI ----------------------------------------------------------------------------

    async def _start(self, endpoint: str, body: bytes) -> Any:
        request_cls, handler = self._handlers[endpoint]
        try:
            request = request_cls.model_validate_json(body)
        except Exception as exc:  # vLLM's validators raise more than ValidationError
            return 400, json.dumps(request_error_body(exc))
        unknown = sorted(request.model_extra or ())
        if unknown:
            # vLLM ignores fields it does not know (after a debug log line); OpenAI's API refuses
            # them, and a misspelt parameter silently ignored is worse than a 400.
            return 400, json.dumps(error_body(
                f"Unrecognized request argument supplied: {', '.join(unknown)}",
                "invalid_request_error", param=unknown[0], code="unknown_parameter"))
        try:
            result = await handler(request, None)
        except Exception as exc:
            return self._error_result(exc)
        error = vllm.error_of(result)
        if error is not None:
            status, err = from_vllm_error(error)
            return status, json.dumps(err)
        return result

    @staticmethod
    def _error_result(exc: Exception) -> Result:
        """Some failures (a prompt longer than the context) are raised rather than returned;
        vLLM's own mapper gives them the status `vllm serve` would."""
        error = vllm.error_from_exception(exc)
        if error["code"] >= 500:
            logger.error("Request failed in vLLM: %r", exc, exc_info=exc)
        status, body = from_vllm_error(error)
        return status, json.dumps(body)

    async def openai(self, endpoint: str, body: bytes) -> Result:
        """A non-streaming chat or completion request."""
        result = await self._start(endpoint, body)
        if isinstance(result, tuple):
            return result
        return 200, result.model_dump_json()

    async def openai_stream(self, endpoint: str, body: bytes) -> AsyncIterator[Any]:
        """A streaming request: ``(status, text)`` first, then SSE text as it is produced."""
        result = await self._start(endpoint, body)
        if isinstance(result, tuple):
            yield result
            return
        if not hasattr(result, "__aiter__"):  # asked for a stream, vLLM answered whole
            yield 200, f"data: {result.model_dump_json()}\n\ndata: [DONE]\n\n"
            return
        first = True
        async for text in coalesce(result) if self._coalesce_streams else result:
            yield (200, text) if first else text
            first = False

    # -- MariTalk ----------------------------------------------------------------------------

    async def maritalk(self, kind: str, body: bytes) -> Result:
        """``/generate`` (kind ``raw``) or ``/chat/generate`` (kind ``chat``)."""
        try:
            if kind == "chat":
                chat = ChatGenerateRequest.model_validate_json(body)
                params: GenerateRequest | ChatGenerateRequest = chat
                prompt = self._tokenizer.apply_chat_template(
                    [m.model_dump() for m in chat.messages],
                    add_generation_prompt=True,
                    tokenize=False,
                )
                ids = self._tokenizer.encode(prompt, add_special_tokens=False)
            else:
                params = GenerateRequest.model_validate_json(body)
                ids = self._tokenizer.encode(params.prompt)
            sampling = vllm.final_only_params(**params.sampling_kwargs())
        except Exception as exc:  # all from the body: fields, chat template, sampling bounds
            return 400, json.dumps(request_error_body(exc))
        room = self._max_model_len - len(ids)
        if params.max_tokens > room:
            message = (
                f"This model's maximum context length is {self._max_model_len} tokens; the prompt "
                f"has {len(ids)} tokens and max_tokens is {params.max_tokens}. Shorten the prompt "
                "or lower max_tokens."
            )
            return 400, json.dumps(
                error_body(
                    message,
                    "invalid_request_error",
                    param="messages" if kind == "chat" else "prompt",
                    code="context_length_exceeded",
                )
            )
        arrival = time.monotonic()
        final = None
        try:
            async for output in self._engine.generate(
                {"prompt_token_ids": ids}, sampling, f"maritalk-{uuid.uuid4().hex}"
            ):
                final = output
        except Exception as exc:
            return self._error_result(exc)
        done = time.monotonic()
        assert final is not None
        completion = final.outputs[0]
        stamps = vllm.request_timings(final)
        if stamps is not None:
            queued, scheduled, first_token, last_token = stamps
            queue, prompt_s, generation = timings(
                queued=queued, scheduled=scheduled, first_token=first_token,
                last_token=last_token,
            )
        else:  # stats disabled: the replica's own view, all time before decode counted as prompt
            queue, prompt_s, generation = 0.0, done - arrival, 0.0
        response = GenerateResponse(
            output=completion.text,
            queue_time=queue,
            prompt_time=prompt_s,
            generation_time=generation,
            prompt_tokens=len(ids),
            completion_tokens=len(completion.token_ids),
            finish_reason=completion.finish_reason,
        )
        return 200, response.model_dump_json()

    # -- Health and numbers ------------------------------------------------------------------

    async def ready(self) -> str:
        """Answers once the engine is up (Serve routes only to constructed replicas)."""
        return self._config.name

    async def check_health(self) -> None:
        """Serve's health probe: a dead engine makes Serve replace this replica."""
        await self._engine.check_health()

    async def metrics_text(self) -> str:
        """vLLM's own Prometheus families from this replica, plus the frontend's live count."""
        lines = vllm.engine_metrics_lines()
        unfinished = vllm.unfinished_requests(self._engine)
        lines += [
            "# HELP serve_app_engine_unfinished_requests Requests the engine frontend still tracks.",
            "# TYPE serve_app_engine_unfinished_requests gauge",
            f'serve_app_engine_unfinished_requests{{model_name="{self._config.name}"}} {unfinished}',
        ]
        return "\n".join(lines) + "\n"

    def __del__(self) -> None:
        reporter = getattr(self, "_reporter", None)
        if reporter is not None:
            reporter.stop()
        engine = getattr(self, "_engine", None)
        if engine is not None:
            # Its requests are over by now (drained by Serve or the replica's listener). All
            # the engine core still does on SIGTERM is tear down its process groups and collect
            # garbage, which took over 3 s on a busy 2-core box; vLLM waits 5 s for it by
            # default before it kills the process anyway, and `docker stop` gives 10 s in all.
            engine.shutdown(timeout=0)
