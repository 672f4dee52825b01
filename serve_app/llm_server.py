"""The LLM deployment: one vLLM ``AsyncLLM`` per replica, served through vLLM's own OpenAI layer.

This is the only module that imports vLLM. Methods take the raw request body (bytes, cheap to
ship across the Ray hop) and return ``(status, json_text)``; streaming methods yield
``(status, text)`` first and then plain SSE text, coalesced (see ``streaming.py``). Expected
failures are values, never exceptions, so a bad request cannot hurt the replica.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import State

from serve_app.affinity import (
    cpu_count,
    engine_launch,
    pin_to_frontend,
    reserved_cores,
    single_worker,
)
from serve_app.config import LicenseConfig, ModelConfig
from serve_app.errors import error_body, from_vllm_error
from serve_app.maritalk import ChatGenerateRequest, GenerateRequest, GenerateResponse, timings
from serve_app.models import resolve_model, weight_bytes
from serve_app.process_guard import guard_children
from serve_app.streaming import PacedEngine, coalesce
from serve_app.validation import validation_error_body

logger = logging.getLogger("ray.serve")

Result = tuple[int, str]


class LLMServer:
    """One vLLM engine. Constructed by Serve on a GPU (or, on CPU boxes, ``num_cpus: 0``)."""

    # Streams cross a Ray hop to the router ingress; ``ColocatedIngress`` turns this off.
    _coalesce_streams = True

    async def __init__(
        self, config: ModelConfig, model_cache_dir: str, license: LicenseConfig | None = None
    ) -> None:
        # vLLM is imported here, not at module level: the ingress and the driver import this
        # package too and must stay light.
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import FrontendArgs
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        self._config = config
        self._reporter = None
        if license is not None:
            from serve_app.license_actor import InstanceReporter, get_license_actor

            # Before loading anything: a replica past the license's cap must not start.
            gpus = float(config.tensor_parallel_size) if config.device == "gpu" else 0.0
            self._reporter = InstanceReporter(get_license_actor(license), config.name, gpus)
            await self._reporter.start()
        path = await asyncio.to_thread(resolve_model, config.source, model_cache_dir)
        engine_args = AsyncEngineArgs(**config.engine_args(str(path)))
        vllm_config = engine_args.create_engine_config(UsageContext.OPENAI_API_SERVER)
        cpu = config.device == "cpu"
        inproc = cpu and config.cpu_inproc_worker and single_worker(
            vllm_config.parallel_config.world_size, config.engine_kwargs
        )
        if inproc:
            # vLLM's CPU platform rewrites "uni" to "mp" while it builds the config (its model
            # worker must start in a fresh process, with libgomp preloaded); the engine-core
            # process it spawns next is such a process, so "uni" is set after the fact.
            vllm_config.parallel_config.distributed_executor_backend = "uni"
        with contextlib.ExitStack() as launch:
            if cpu:
                launch.enter_context(engine_launch(
                    reserved_cores(config.cpu_reserved_cores, cpu_count(), weight_bytes(path))))
            if inproc:
                from vllm.utils.ompmultiprocessing import OMPProcessManager

                # The OpenMP threads and core binding vLLM's executor gives its worker process,
                # given to the engine core that runs the worker instead (made after the reserve
                # is in the environment: the manager reads it).
                launch.enter_context(
                    OMPProcessManager(vllm_config).configure_omp_envs(rank=0, local_rank=0))
            self._engine = AsyncLLM.from_vllm_config(
                vllm_config, usage_context=UsageContext.OPENAI_API_SERVER, disable_log_stats=False
            )
        # The engine core must not outlive this replica, however the replica ends.
        self._engine_guard = guard_children()
        if cpu:
            pin_to_frontend()  # off the engine's cores (or onto one shared core, no reserve)
        # init_app_state wants the flat Namespace `vllm serve` builds from both arg groups.
        args = argparse.Namespace(**(vars(FrontendArgs()) | vars(engine_args)))
        state = State()
        await init_app_state(
            self._engine, state, args, supported_tasks=await self._engine.get_supported_tasks()
        )
        if config.stream_interval_ms > 0:
            # vLLM's OpenAI layer reads every output through `engine_client.generate`; pacing
            # those reads lets vLLM merge tokens before they become SSE events.
            paced = PacedEngine(self._engine, config.stream_interval_ms / 1000)
            state.openai_serving_chat.engine_client = paced
            state.openai_serving_completion.engine_client = paced
        self._handlers = {
            "chat": (ChatCompletionRequest, state.openai_serving_chat.create_chat_completion),
            "completions": (CompletionRequest, state.openai_serving_completion.create_completion),
        }
        self._tokenizer = self._engine.get_tokenizer()
        self._max_model_len = vllm_config.model_config.max_model_len
        logger.info("LLM replica ready: %s from %s", config.name, path)

    # -- OpenAI ----------------------------------------------------------------------------

    async def _start(self, endpoint: str, body: bytes) -> Any:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        request_cls, handler = self._handlers[endpoint]
        try:
            request = request_cls.model_validate_json(body)
        except ValidationError as exc:
            return 400, json.dumps(validation_error_body(exc))
        try:
            result = await handler(request, None)
        except Exception as exc:
            return self._error_result(exc)
        if isinstance(result, ErrorResponse):
            status, err = from_vllm_error(result.error.model_dump())
            return status, json.dumps(err)
        return result

    @staticmethod
    def _error_result(exc: Exception) -> Result:
        """Some failures (a prompt longer than the context) are raised rather than returned;
        vLLM's own mapper gives them the status `vllm serve` would."""
        from vllm.entrypoints.serve.exception_handling.error_response import (
            create_error_response,
        )

        error = create_error_response(exc).error
        if error.code >= 500:
            logger.error("Request failed in vLLM: %r", exc)
        status, body = from_vllm_error(error.model_dump())
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
        from vllm.sampling_params import RequestOutputKind, SamplingParams

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
        except ValidationError as exc:
            return 400, json.dumps(validation_error_body(exc))
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
        sampling = SamplingParams(
            **params.sampling_kwargs(), output_kind=RequestOutputKind.FINAL_ONLY
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
        stats = final.metrics
        if stats is not None and getattr(stats, "first_token_ts", 0):
            queue, prompt_s, generation = timings(
                queued=stats.queued_ts,
                scheduled=stats.scheduled_ts,
                first_token=stats.first_token_ts,
                last_token=stats.last_token_ts,
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
        from prometheus_client import REGISTRY, generate_latest

        text = generate_latest(REGISTRY).decode()
        lines = [ln for ln in text.splitlines() if "vllm:" in ln]
        unfinished = self._engine.output_processor.get_num_unfinished_requests()
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
            engine.shutdown()
