"""Every use of vLLM in the app, its internals above all, for the pinned release (``versions``).

The app runs vLLM's own OpenAI layer inside a Ray Serve replica, where `vllm serve` would run it
in a process of its own, and shapes CPU placement and streaming around the engine. That leans on
the following, none of which is a stable API; a release may move any of them:

1. Module paths of the OpenAI layer: request models per endpoint
   (``entrypoints.openai.{chat_completion,completion}.protocol``), ``ErrorResponse``
   (``entrypoints.serve.engine.protocol``), the exception mapper ``create_error_response``
   (``entrypoints.serve.exception_handling.error_response``), ``FrontendArgs``
   (``entrypoints.launchers.cli_args``) and ``init_app_state``
   (``entrypoints.launchers.api_server.app_state``).
2. ``init_app_state(engine, state, args, supported_tasks=...)`` with a namespace built here: it
   reads `vllm serve`'s parsed arguments, i.e. every ``FrontendArgs`` field and every
   ``AsyncEngineArgs`` field, from one flat ``argparse.Namespace``, and puts the serving
   objects on ``state.openai_serving_chat`` / ``state.openai_serving_completion``.
3. The executor backend rewritten after the config is built: vLLM's CPU platform turns
   ``distributed_executor_backend`` "uni" into "mp" while it builds the config; setting
   ``parallel_config.distributed_executor_backend = "uni"`` afterwards makes the engine-core
   process run the model worker itself (``affinity.single_worker`` says when and why).
4. ``utils.ompmultiprocessing.OMPProcessManager(config).configure_omp_envs(rank, local_rank)``:
   the OpenMP thread count and core binding vLLM gives a CPU worker process, given instead to
   the engine core that then runs the worker.
5. Swapping ``engine_client`` on the chat and completion serving objects for a pacing wrapper
   (``streaming.PacedEngine``): every output of the OpenAI layer is read through
   ``engine_client.generate``.
6. The output processor's request index and collectors: ``AsyncLLM.output_processor`` with
   ``external_req_ids`` (request id -> internal ids), ``request_states[id].queue`` (a
   ``RequestOutputCollector`` with ``put`` and ``output``), and ``get_num_unfinished_requests``.
   Pacing wraps the collector's ``put`` to learn at once when a held stream's final output
   arrives; /metrics reports the unfinished count.
7. The metrics registry: vLLM registers its Prometheus families (``vllm:*``) in
   ``prometheus_client``'s default ``REGISTRY`` of the process that runs ``AsyncLLM``.
8. ``RequestOutput.metrics`` as v1's ``RequestStateStats`` (``queued_ts``, ``scheduled_ts``,
   ``first_token_ts``, ``last_token_ts``): MariTalk's timings.
9. ``VLLM_CPU_NUM_OF_RESERVED_CPU`` (a documented variable, listed because ``affinity`` relies
   on how the CPU backend binds the cores left after the reserve).
10. The CPU linear dispatch, for ``kernels.bf16_weights``: vLLM's CPU layers call
   ``model_executor.layers.utils.dispatch_cpu_unquantized_gemm(layer, remove_weight)`` (looked
   up in that module at each call) after loading, and then compute ``layer.cpu_linear(x, weight,
   bias)``; its oneDNN branch is ``_custom_ops.create_onednn_mm(weight.t(), 32)`` with the op
   ``_C::onednn_mm(out, x, bias, handler_tensor)`` (the kernel calls it for more than two
   rows). ``bf16_weight_plugin`` is a vLLM general plugin (the ``vllm.general_plugins`` entry
   point, a public mechanism), so it runs in the engine-core process vLLM spawns.
11. The AOT compile cache: ``compilation.decorators._try_load_aot_compiled_fn`` loads a saved
   graph with ``torch.compiler.load_compiled_function`` (looked up at each call) and then calls
   ``loaded._artifacts.compiled_fn.finalize_loading(vllm_config)``, which only vLLM's own
   ``VllmSerializableFunction`` has. On CPU the graph goes to inductor directly, and torch saves
   inductor's output bundled whole (``BundledAOTAutogradSerializableCallable``), so every load
   failed ("'function' object has no attribute 'finalize_loading'") and every start compiled
   again, ~100 s on 2 cores. ``aot_cache_plugin`` (a general plugin too) gives such a loaded
   function a ``finalize_loading`` that does nothing, as nothing of it is left to load.

Engine construction (``AsyncEngineArgs``, ``create_engine_config``, ``UsageContext``,
``AsyncLLM.from_vllm_config``) and sampling (``SamplingParams``, ``RequestOutputKind``) are
vLLM's public Python API and are imported here too, so that this is the only module that
imports vLLM. ``missing()`` checks each item above without starting an engine;
``tests/unit/test_vllm_internals.py`` runs it, so an upgrade that moves one fails there by name.
Imports are inside functions: the router and the driver import the package and must not load
vLLM.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

RESERVED_CPU_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"

# (module, attribute) pairs the app imports or inspects; see the items above.
IMPORTS = (
    ("vllm.engine.arg_utils", "AsyncEngineArgs"),
    ("vllm.usage.usage_lib", "UsageContext"),
    ("vllm.v1.engine.async_llm", "AsyncLLM"),
    ("vllm.sampling_params", "SamplingParams"),
    ("vllm.sampling_params", "RequestOutputKind"),
    ("vllm.entrypoints.launchers.cli_args", "FrontendArgs"),
    ("vllm.entrypoints.launchers.api_server.app_state", "init_app_state"),
    ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest"),
    ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest"),
    ("vllm.entrypoints.serve.engine.protocol", "ErrorResponse"),
    ("vllm.entrypoints.serve.exception_handling.error_response", "create_error_response"),
    ("vllm.utils.ompmultiprocessing", "OMPProcessManager"),
    ("vllm.v1.engine.output_processor", "OutputProcessor"),
    ("vllm.v1.engine.output_processor", "RequestOutputCollector"),
    ("vllm.v1.metrics.stats", "RequestStateStats"),
    ("vllm.config", "ParallelConfig"),
    ("vllm.entrypoints.openai.chat_completion.serving", "OpenAIServingChat"),
    ("vllm.entrypoints.openai.completion.serving", "OpenAIServingCompletion"),
    ("vllm.model_executor.layers.utils", "dispatch_cpu_unquantized_gemm"),
    ("vllm._custom_ops", "create_onednn_mm"),
    ("vllm.compilation.decorators", "_try_load_aot_compiled_fn"),
)

# What the tests' stand-ins build from vLLM (tests/fakes.py, the pacing tests): named here, so
# that ``missing()`` checks them too and they reach vLLM through this module only (``symbol``).
TEST_IMPORTS = (
    ("vllm.renderers", "renderer_from_config"),
    ("vllm.v1.engine.input_processor", "InputProcessor"),
    ("vllm.logprobs", "Logprob"),
    ("vllm.outputs", "CompletionOutput"),
    ("vllm.outputs", "RequestOutput"),
    ("vllm.v1.engine", "EngineCoreOutput"),
    ("vllm.v1.engine", "EngineCoreRequest"),
    ("vllm.v1.engine", "FinishReason"),
    # The accuracy gate (tests/e2e/test_precision_gate.py): vLLM's offline engine, public API.
    ("vllm", "LLM"),
)

# `vllm serve` options a ModelConfig passes through by name (config.ModelConfig.frontend_args).
FRONTEND_OPTIONS = ("enable_auto_tool_choice", "tool_call_parser", "chat_template")


def symbol(name: str) -> Any:
    """A name of ``IMPORTS`` or ``TEST_IMPORTS``, from the module listed with it."""
    module = next(m for m, n in (*IMPORTS, *TEST_IMPORTS) if n == name)
    return getattr(importlib.import_module(module), name)


def missing() -> list[str]:
    """Everything listed in the module docstring that this vLLM lacks (empty when all fit)."""
    out = []
    for module, name in (*IMPORTS, *TEST_IMPORTS):
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            out.append(f"{module}.{name}: {exc}")
    if out:
        return out
    params = inspect.signature(symbol("init_app_state")).parameters
    out += [f"init_app_state has no parameter {p!r}"
            for p in ("engine_client", "state", "args", "supported_tasks") if p not in params]
    frontend = vars(symbol("FrontendArgs")())
    out += [f"FrontendArgs has no field {f!r}" for f in FRONTEND_OPTIONS if f not in frontend]
    engine_fields = {f.name for f in dataclasses.fields(symbol("AsyncEngineArgs"))}
    out += [f"AsyncEngineArgs has no field {f!r}"
            for f in ("reasoning_parser", "served_model_name") if f not in engine_fields]
    parallel_fields = {f.name for f in dataclasses.fields(symbol("ParallelConfig"))}
    if "distributed_executor_backend" not in parallel_fields:
        out.append("ParallelConfig has no field 'distributed_executor_backend'")
    for serving in ("OpenAIServingChat", "OpenAIServingCompletion"):
        # Pacing replaces engine_client, so every output must be read through its generate.
        if "self.engine_client.generate(" not in inspect.getsource(
                importlib.import_module(symbol(serving).__module__)):
            out.append(f"{serving} no longer reads outputs through engine_client.generate")
    if not hasattr(symbol("OMPProcessManager"), "configure_omp_envs"):
        out.append("OMPProcessManager has no configure_omp_envs")
    processor = symbol("OutputProcessor")(None, log_stats=False)
    out += [f"OutputProcessor has no {a!r}" for a in
            ("external_req_ids", "request_states", "get_num_unfinished_requests")
            if not hasattr(processor, a)]
    collector = symbol("RequestOutputCollector")(symbol("RequestOutputKind").DELTA, "probe")
    out += [f"RequestOutputCollector has no {a!r}" for a in ("put", "output")
            if not hasattr(collector, a)]
    loader = inspect.getsource(symbol("_try_load_aot_compiled_fn"))
    out += [f"_try_load_aot_compiled_fn no longer calls {a}" for a in
            ("torch.compiler.load_compiled_function(", "_artifacts.compiled_fn.finalize_loading(")
            if a not in loader]
    dispatch = inspect.getsource(symbol("dispatch_cpu_unquantized_gemm"))
    out += [f"dispatch_cpu_unquantized_gemm no longer uses {a}" for a in
            ("layer.cpu_linear", "create_onednn_mm(origin_weight.t(), 32)", "ops.onednn_mm(")
            if a not in dispatch]
    stats = symbol("RequestStateStats")()
    out += [f"RequestStateStats has no {a!r}" for a in
            ("queued_ts", "scheduled_ts", "first_token_ts", "last_token_ts")
            if not hasattr(stats, a)]
    return out


# -- engine ----------------------------------------------------------------------------------


def engine_config(kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """``(AsyncEngineArgs, VllmConfig)`` for ``kwargs``, as `vllm serve` builds them."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    engine_args = AsyncEngineArgs(**kwargs)
    return engine_args, engine_args.create_engine_config(UsageContext.OPENAI_API_SERVER)


def world_size(vllm_config: Any) -> int:
    return vllm_config.parallel_config.world_size


def max_model_len(vllm_config: Any) -> int:
    return vllm_config.model_config.max_model_len


def model_path(vllm_config: Any) -> str:
    """The local folder the engine loads."""
    return vllm_config.model_config.model


def run_worker_in_engine_core(vllm_config: Any) -> None:
    """Item 3: the engine-core process runs the model worker itself (CPU, one worker).

    vLLM's CPU platform rewrites "uni" to "mp" while it builds the config (its model worker
    must start in a fresh process, with libgomp preloaded); the engine-core process it spawns
    next is such a process, so "uni" is set after the fact."""
    vllm_config.parallel_config.distributed_executor_backend = "uni"


def worker_omp_env(vllm_config: Any) -> contextlib.AbstractContextManager[Any]:
    """Item 4: within the block, the OpenMP threads and core binding vLLM's executor would give
    its worker process are in this process's environment, for the engine core it starts.
    Enter it after the core reserve is in the environment: the manager reads it."""
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    return OMPProcessManager(vllm_config).configure_omp_envs(rank=0, local_rank=0)


def start_engine(vllm_config: Any) -> Any:
    """``AsyncLLM`` with statistics on (they feed /metrics and MariTalk's timings)."""
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_vllm_config(
        vllm_config, usage_context=UsageContext.OPENAI_API_SERVER, disable_log_stats=False)


def bf16_weight_plugin() -> None:
    """Item 10, vLLM's ``vllm.general_plugins`` entry point (every vLLM process runs it): in an
    engine whose environment sets ``kernels.bf16_weights.ENV``, float32 matrices that bfloat16
    holds exactly take the bfloat16-weight kernel where vLLM would take oneDNN."""
    import os

    from serve_app.kernels import bf16_weights

    if os.environ.get(bf16_weights.ENV) != "1":
        return
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "serve_app", False) or not bf16_weights.load():
        return

    def dispatch(layer: Any, remove_weight: bool) -> None:
        if not bf16_weight_linear(layer, remove_weight):
            original(layer, remove_weight)

    dispatch.serve_app = True  # type: ignore[attr-defined]
    utils.dispatch_cpu_unquantized_gemm = dispatch
    # The compiled graph calls the kernel, which vLLM's compile-cache key cannot know of: a
    # cache of its own, so that neither path loads the other's graph (item 11).
    from vllm import envs

    os.environ["VLLM_CACHE_ROOT"] = os.path.join(envs.VLLM_CACHE_ROOT, "serve_app-bf16-weights")


def aot_cache_plugin() -> None:
    """Item 11, a ``vllm.general_plugins`` entry point: vLLM's compile cache loads on CPU."""
    import torch.compiler

    original = torch.compiler.load_compiled_function
    if getattr(original, "serve_app", False):
        return

    def load(*args: Any, **kwargs: Any) -> Any:
        loaded = original(*args, **kwargs)
        compiled = loaded._artifacts.compiled_fn
        if not hasattr(compiled, "finalize_loading"):
            compiled.finalize_loading = _loaded_whole
        return loaded

    load.serve_app = True  # type: ignore[attr-defined]
    torch.compiler.load_compiled_function = load


def _loaded_whole(_vllm_config: Any) -> None:
    """``finalize_loading`` of a graph torch loaded whole: nothing is left to load."""


def bf16_weight_linear(layer: Any, remove_weight: bool) -> bool:
    """vLLM's oneDNN branch of the dispatch (item 10), with the kernel in front of it: False,
    and nothing done, for a layer vLLM would not give oneDNN or the kernel does not fit."""
    import torch
    from vllm import _custom_ops as ops
    from vllm.platforms import CpuArchEnum, current_platform

    from serve_app.kernels import bf16_weights

    # vLLM's branches before oneDNN's: zentorch where installed (any dtype), and the SGL kernel,
    # which takes 16- and 8-bit weights only, never the float32 ones ``fits`` requires.
    weight = getattr(layer, "weight", None)
    zen = current_platform.is_zen_cpu() and hasattr(torch.ops.zentorch, "zentorch_linear_unary")
    if (weight is None or not ops._supports_onednn or zen
            or current_platform.get_cpu_architecture() != CpuArchEnum.X86
            or not bf16_weights.fits(weight.data)):
        return False
    handler = ops.create_onednn_mm(weight.data.t(), 32)
    packed = bf16_weights.pack(weight.data)

    def cpu_linear(x: Any, _weight: Any, bias: Any) -> Any:
        out = torch.empty((*x.shape[:-1], handler.n), dtype=x.dtype)
        bf16_weights.linear(out, x.reshape(-1, handler.k), packed, bias, handler.handler_tensor)
        return out

    layer.cpu_linear = cpu_linear
    layer.serve_app_bf16_weights = (packed, handler)  # owned by the layer, as vLLM's handler is
    bf16_weights.taken += 1
    if remove_weight:
        layer.weight = torch.nn.Parameter(torch.empty(0, dtype=weight.dtype),
                                          requires_grad=False)
    return True


# -- the OpenAI layer ------------------------------------------------------------------------


def frontend_namespace(engine_fields: dict[str, Any],
                       frontend: dict[str, Any]) -> argparse.Namespace:
    """Item 2: the flat namespace `vllm serve` builds from both argument groups: the
    ``AsyncEngineArgs`` fields (``vars(engine_args)``) and vLLM's frontend defaults with the
    model's frontend options (``ModelConfig.frontend_args``) over them."""
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    defaults = vars(FrontendArgs())
    unknown = set(frontend) - set(defaults)
    if unknown:
        raise ValueError(f"not vLLM frontend options: {sorted(unknown)}")
    return argparse.Namespace(**(defaults | frontend | engine_fields))


@dataclass
class OpenAILayer:
    """vLLM's chat and completion handlers: ``(request_cls, handler)`` per endpoint."""

    chat: Any
    completion: Any

    def handlers(self) -> dict[str, tuple[type, Callable[..., Any]]]:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        return {
            "chat": (ChatCompletionRequest, self.chat.create_chat_completion),
            "completions": (CompletionRequest, self.completion.create_completion),
        }

    def pace(self, engine_client: Any) -> None:
        """Item 5: the layer reads every output through ``engine_client.generate``."""
        self.chat.engine_client = engine_client
        self.completion.engine_client = engine_client


async def openai_layer(engine: Any, args: argparse.Namespace) -> OpenAILayer:
    """Item 2: vLLM's serving objects, built by ``init_app_state`` on a starlette ``State``."""
    from starlette.datastructures import State
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state

    state = State()
    await init_app_state(engine, state, args, supported_tasks=await engine.get_supported_tasks())
    return OpenAILayer(state.openai_serving_chat, state.openai_serving_completion)


def error_of(result: Any) -> dict[str, Any] | None:
    """The error of a handler's result if it is vLLM's ``ErrorResponse``, else None."""
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    return result.error.model_dump() if isinstance(result, ErrorResponse) else None


def error_from_exception(exc: Exception) -> dict[str, Any]:
    """vLLM's own mapping of a raised exception to an error (status in ``code``)."""
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    return create_error_response(exc).error.model_dump()


# -- sampling and outputs --------------------------------------------------------------------


def final_only_params(**kwargs: Any) -> Any:
    """``SamplingParams`` whose request yields one output, when finished."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    return SamplingParams(**kwargs, output_kind=RequestOutputKind.FINAL_ONLY)


def delta_kind() -> Any:
    """The output kind of streams (each output holds only what is new)."""
    from vllm.sampling_params import RequestOutputKind

    return RequestOutputKind.DELTA


def request_timings(output: Any) -> tuple[float, float, float, float] | None:
    """Item 8: (queued, scheduled, first token, last token) timestamps, None without stats."""
    stats = getattr(output, "metrics", None)
    if stats is None or not getattr(stats, "first_token_ts", 0):
        return None
    return stats.queued_ts, stats.scheduled_ts, stats.first_token_ts, stats.last_token_ts


def output_collector(engine: Any, request_id: str) -> Any:
    """Item 6: the collector vLLM puts ``request_id``'s outputs in (None if not found)."""
    processor = getattr(engine, "output_processor", None)
    internal = getattr(processor, "external_req_ids", {}).get(request_id)
    states = getattr(processor, "request_states", {})
    state = states.get(internal[0]) if internal else None
    return getattr(state, "queue", None)


def on_put(collector: Any, callback: Callable[[Any], None]) -> None:
    """Item 6: call ``callback(output)`` after each output vLLM puts into ``collector``."""
    put = collector.put

    def put_and_call(output: Any) -> None:
        put(output)
        callback(output)

    collector.put = put_and_call


def collected(collector: Any) -> Any:
    """Item 6: what the collector holds that its reader has not taken yet."""
    return collector.output


def unfinished_requests(engine: Any) -> int:
    """Item 6: requests the engine's frontend still tracks."""
    return engine.output_processor.get_num_unfinished_requests()


def greedy_chat(model_path: str, dtype: str, prompts: list[str], max_tokens: int,
                bf16_weight_decode: bool = False, **engine_kwargs: Any) -> list[list[int]]:
    """Greedy token ids of each prompt as a one-turn chat, from vLLM's offline ``LLM`` in
    ``dtype``, each prompt alone (one stream, as the kernel of ``bf16_weight_decode`` decodes);
    the engine is stopped before this returns. A process runs vLLM's plugins once, and its
    engine core inherits that: one kernel setting per process."""
    from serve_app.kernels import bf16_weights

    with bf16_weights.in_engine(bf16_weight_decode):
        llm = symbol("LLM")(model=model_path, dtype=dtype, **engine_kwargs)
    try:
        params = symbol("SamplingParams")(temperature=0.0, max_tokens=max_tokens)
        return [list(llm.chat([{"role": "user", "content": p}], params, use_tqdm=False)[0]
                     .outputs[0].token_ids) for p in prompts]
    finally:
        llm.llm_engine.engine_core.shutdown()


def engine_metrics_lines() -> list[str]:
    """Item 7: vLLM's Prometheus lines (``vllm:*``) from this process's default registry."""
    from prometheus_client import REGISTRY, generate_latest

    return [ln for ln in generate_latest(REGISTRY).decode().splitlines() if "vllm:" in ln]
