"""Where one decode step's time goes, for one stream (c=1), in vLLM's engine on CPU.

    .venv/bin/python scripts/profile_decode_step.py [--dtype float32] [--eager] [--steps 64]

Runs vLLM's engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the model worker in the
engine core, as the app runs it on CPU), with OpenMP bound to every core as the app's engine is.
Wall-clock timers wrap the engine's step and its parts; one decode step's model forward is then
split by torch's profiler into operator classes. Categories, per step:

- weights: the linear layers (q/k/v, o, gate/up, down) and the LM head (``compute_logits``:
  the tied embedding matrix, the largest single read);
- attention: vLLM's CPU paged attention and KV-cache writes;
- other model ops: norms, rotary, activation, residual adds (memory-light element-wise work);
- sampling: the sampler (greedy argmax, penalties, logprob bookkeeping);
- model runner: input preparation and output bookkeeping around the forward;
- scheduler: ``schedule`` and ``update_from_output``;
- detokenizer: the frontend's output processor (incremental detokenization, request outputs);
- Python overhead: the rest of a step (engine-core and engine loops, queues).

It prints one table and, with ``--json``, writes it. Numbers move with the machine's load:
record ``uptime`` with them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path


def _bind_openmp() -> None:
    # Before torch loads: the engine's OpenMP threads, one per allowed core, bound as vLLM binds
    # its worker (serve_app.vllm_internals.worker_omp_env does the same for the app's engine).
    cpus = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("OMP_NUM_THREADS", str(len(cpus)))
    os.environ.setdefault("GOMP_CPU_AFFINITY", " ".join(map(str, cpus)))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    for k, v in {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(k, v)


class Timers:
    """Accumulated time per name, with nesting (a child's time is also its parent's): wall time,
    and this thread's CPU time, which a busy machine's other processes do not inflate (with one
    OpenMP thread, this thread runs the whole step)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.on = False

    def wrap(self, owner: object, attr: str, name: str) -> None:
        inner = getattr(owner, attr)

        def timed(*args, **kwargs):
            if not self.on:
                return inner(*args, **kwargs)
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.total[name] += time.perf_counter() - start
                self.cpu[name] += time.thread_time() - cpu

        setattr(owner, attr, timed)


# torch profiler operator names (eager and inductor-compiled) -> category.
def op_category(name: str) -> str | None:
    n = name.lower()
    if any(k in n for k in ("onednn_mm", "aten::mm", "aten::addmm", "aten::linear", "zentorch",
                            "weight_packed_linear", "aten::matmul", "bf16w_linear")):
        return "weights"
    if any(k in n for k in ("attn", "attention", "reshape_and_cache", "paged")):
        return "attention"
    return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder (default: the embedded SmolLM2)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--eager", action="store_true", help="vLLM eager (default: compiled)")
    p.add_argument("--steps", type=int, default=64, help="decode steps timed")
    p.add_argument("--prompt-tokens", type=int, default=550)
    p.add_argument("--json", help="write the table here")
    args = p.parse_args(argv)
    _bind_openmp()

    import torch
    from vllm import LLM, SamplingParams
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.engine.output_processor import OutputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    path = args.model
    if path is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from serve_app.config import DEFAULT_CACHE_DIR, DEFAULT_MODEL_SOURCE
        from serve_app.weights import resolve_model

        path = str(resolve_model(DEFAULT_MODEL_SOURCE, DEFAULT_CACHE_DIR))

    timers = Timers()
    timers.wrap(LLMEngine, "step", "step")
    timers.wrap(EngineCore, "step", "engine_core.step")
    timers.wrap(Scheduler, "schedule", "scheduler")
    timers.wrap(Scheduler, "update_from_output", "scheduler.update")
    timers.wrap(GPUModelRunner, "execute_model", "runner.execute_model")
    timers.wrap(GPUModelRunner, "sample_tokens", "runner.sample_tokens")
    timers.wrap(GPUModelRunner, "_model_forward", "forward")
    timers.wrap(GPUModelRunner, "_sample", "sampling")
    timers.wrap(OutputProcessor, "process_outputs", "detokenizer")

    llm = LLM(model=path, dtype=args.dtype, enforce_eager=args.eager, max_model_len=2048,
              kv_cache_memory_bytes=1 << 30, distributed_executor_backend="uni",
              disable_log_stats=False)
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker \
        .model_runner
    timers.wrap(runner.model, "compute_logits", "lm_head")
    tokenizer = llm.get_tokenizer()
    filler = "The history of science is the study of the development of science. "
    ids = tokenizer.encode(filler * (args.prompt_tokens // 10 + 1))[: args.prompt_tokens]
    warm = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    llm.generate([{"prompt_token_ids": ids[1:]}], warm, use_tqdm=False)

    # One request, prefilled outside the timers, then `steps` decode steps timed.
    engine = llm.llm_engine
    engine.add_request("profile", {"prompt_token_ids": ids},
                       SamplingParams(temperature=0, max_tokens=args.steps + 2, ignore_eos=True))
    engine.step()  # prefill
    timers.on = True
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    wall = time.perf_counter() - start
    timers.on = False

    # The forward's operator split, over a few more decode steps.
    ops: dict[str, float] = defaultdict(float)
    split_steps = 4
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(split_steps):
            engine.step()
    for event in prof.key_averages():
        category = op_category(event.key)
        if category:
            ops[category] += event.self_cpu_time_total / 1e6 / split_steps
    # Every operator's own time: the forward's, the sampler's and the runner's tensor work.
    prof_forward = sum(e.self_cpu_time_total for e in prof.key_averages()
                       if op_category(e.key) or e.key.startswith(("aten::", "_C::", "vllm::"))
                       ) / 1e6 / split_steps
    with contextlib.suppress(Exception):
        while engine.has_unfinished_requests():
            engine.step()

    def split(totals: dict[str, float], step: float) -> dict[str, float]:
        t = {k: v / args.steps for k, v in totals.items()}
        forward = t.get("forward", 0.0)
        # The profiler's operator shares of the forward, applied to this clock's forward time.
        linear = forward * min(1.0, ops.get("weights", 0.0) / max(prof_forward, 1e-9))
        attention = forward * min(1.0, ops.get("attention", 0.0) / max(prof_forward, 1e-9))
        rows = {
            "weights (linear layers)": linear,
            "weights (LM head, tied embedding)": t.get("lm_head", 0.0),
            "attention": attention,
            "other model ops (norms, rotary, activation, adds)":
                max(0.0, forward - linear - attention),
            "sampling": t.get("sampling", 0.0),
            "model runner (inputs, bookkeeping)": max(0.0, t.get("runner.execute_model", 0.0)
                                                       + t.get("runner.sample_tokens", 0.0)
                                                       - forward - t.get("lm_head", 0.0)
                                                       - t.get("sampling", 0.0)),
            "scheduler": t.get("scheduler", 0.0) + t.get("scheduler.update", 0.0),
            "detokenizer (output processor)": t.get("detokenizer", 0.0),
        }
        rows["Python overhead (engine loops)"] = max(0.0, step - sum(rows.values()))
        return rows

    step = wall / args.steps
    cpu_step = timers.cpu["step"] / args.steps
    rows, cpu_rows = split(timers.total, step), split(timers.cpu, cpu_step)
    print(f"# {path} dtype={args.dtype} {'eager' if args.eager else 'compiled'} "
          f"threads={os.environ['OMP_NUM_THREADS']} load={os.getloadavg()[0]:.2f}")
    print(f"decode step {step * 1000:.2f} ms wall ({1 / step:.1f} tok/s), {cpu_step * 1000:.2f} "
          f"ms CPU of the engine thread, over {args.steps} steps; profiler-timed ops "
          f"{prof_forward * 1000:.2f} ms/step")
    print(f"{'':>52}  {'wall':>10}  {'':>6}  {'thread CPU':>10}")
    for name, value in rows.items():
        print(f"{name:>52}: {value * 1000:7.2f} ms  {value / step:6.1%}  "
              f"{cpu_rows[name] * 1000:7.2f} ms  {cpu_rows[name] / cpu_step:6.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": path, "dtype": args.dtype, "eager": args.eager, "step_s": step,
            "load": os.getloadavg()[0], "split_wall_s": rows, "split_thread_cpu_s": cpu_rows,
            "profiler_ops_s": ops, "profiler_forward_s": prof_forward}, indent=2))


if __name__ == "__main__":
    main()
