"""``--compare``: the same load against raw vLLM and this app (and Ray Serve's own LLM app), one
after the other on the same model, in one run; prints per-concurrency ratios and memory.

Each contender runs as a child process on a loopback port; its memory is the peak summed PSS of
its whole process tree (for Ray: GCS, raylet, proxy, replicas, vLLM's engine core).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

from serve_app.bench.loadgen import build_prompts, run_bench, summary
from serve_app.config import (
    DEFAULT_CACHE_DIR,
    DEFAULT_MODEL_SOURCE,
    TELEMETRY_OFF_ENV,
    ModelConfig,
)
from serve_app.weights import resolve_model

NAME = "bench-model"

# Ray Serve's own LLM app, configured like the others (float32, 1 GiB KV cache), in its
# best measured configuration (throughput-optimized Serve) and on CPU (a CPU bundle, or it asks
# for a GPU).
_RAY_SERVE_LLM = """
import json, os, sys, time
os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
from ray import serve
from ray.serve.llm import LLMConfig, build_openai_app
path, port, NAME, ENV = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
EAGER = {"enforce_eager": True} if sys.argv[5] == "eager" else {}
serve.start(http_options={"host": "127.0.0.1", "port": port})
config = LLMConfig(
    model_loading_config={"model_id": NAME, "model_source": path},
    deployment_config={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
    placement_group_config={"bundles": [{"CPU": 1}]},
    engine_kwargs={"dtype": "float32", "max_model_len": 2048, "kv_cache_memory_bytes": 1 << 30,
                   **EAGER},
    runtime_env={"env_vars": ENV},
)
serve.run(build_openai_app({"llm_configs": [config]}), blocking=False)
while True:
    time.sleep(1)
"""


RANDOM_MODEL = "random-1.5m"


def ensure_random_model(cache_dir: str) -> Path:
    """A 1.5M-parameter Llama with random weights and SmolLM2's tokenizer: decoding costs almost
    nothing, so the benchmark measures the serving stack, not the model."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(cache_dir) / RANDOM_MODEL
    if (out / "config.json").is_file():
        return out
    tokenizer_dir = resolve_model(DEFAULT_MODEL_SOURCE, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=1, num_key_value_heads=1, head_dim=32, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def model_path_for(source: str, cache_dir: str) -> str:
    if source == RANDOM_MODEL:
        return str(ensure_random_model(cache_dir))
    return str(resolve_model(source, cache_dir))


CONTENDERS = ("vllm", "vllm_no_reserve", "serve_app", "serve_app_licensed",
              "serve_app_per_token", "serve_app_worker_process", "serve_app_router",
              "serve_app_front_door", "serve_app_baseline",
              "ray_serve_llm", "ray_serve_llm_haproxy")


def contender_command(name: str, model_path: str, port: int, out: str = ".",
                      eager: bool = False) -> tuple[list[str], dict[str, str]]:
    """The command line and extra environment of one contender.

    ``vllm_no_reserve`` is raw vLLM with no core reserved for its API server (what this app does
    on 2-core boxes for real models, ``affinity.reserved_cores``), to show what that setting
    alone is worth. ``serve_app`` runs unlicensed in its default (colocated) layout;
    ``serve_app_worker_process`` gives vLLM's model worker its own process again, as vLLM does
    (``affinity.single_worker``), to show what running it in the engine core is worth;
    ``serve_app_per_token`` streams every token as produced (``--stream-interval-ms 0``);
    ``serve_app_licensed`` is the same with ``--dev-license`` (a local license server, the
    license actor, heartbeats and usage reports), for the licensing on/off comparison;
    ``serve_app_router`` is the router layout (``colocate_ingress=false``);
    ``serve_app_baseline`` is ``serve_app`` run from another checkout (``--baseline-tree``, e.g. a
    ``git worktree`` of the commit before a change), to tell a regression from noise;
    ``serve_app_front_door`` is a cluster's front door on one node: the same replicas reached
    through Serve's HAProxy (``SERVE_APP_REPLICA_HTTP=false``, as the cluster Serve configs set),
    which relays every message to the replica's direct-ingress server; ``ray_serve_llm`` is
    Ray Serve's own LLM app in throughput-optimized mode, ``ray_serve_llm_haproxy`` the same
    behind HAProxy. All run vLLM compiled (its default and ours) or, with ``eager``, all eager."""
    if name in ("vllm", "vllm_no_reserve"):
        # The dtype this app's `auto` runs on this device, so both sides run the same numbers.
        dtype = ModelConfig().resolved_dtype
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
               "--served-model-name", NAME, "--dtype", dtype, "--max-model-len", "2048",
               "--host", "127.0.0.1", "--port", str(port)] + (["--enforce-eager"] if eager else [])
        return cmd, {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"} if name == "vllm_no_reserve" else {}
    ours = [sys.executable, "-m", "serve_app", "--port", str(port), "--model", model_path]
    if eager:
        ours += ["--enforce-eager"]
    if name in ("serve_app", "serve_app_baseline"):
        return ours, {}
    if name == "serve_app_licensed":
        return ours + ["--dev-license"], {
            "SERVE_APP_DATA_DIR": os.path.join(os.path.abspath(out), "licensed-data"),
            "SERVE_APP_LICENSE_SERVER_PORT": str(port + 100)}
    if name == "serve_app_worker_process":
        return ours, {"SERVE_APP_CPU_INPROC_WORKER": "false"}
    if name == "serve_app_per_token":
        return ours + ["--stream-interval-ms", "0"], {}
    if name == "serve_app_router":
        return ours, {"SERVE_APP_COLOCATE_INGRESS": "false"}
    if name == "serve_app_front_door":
        # HAProxy's stats and metrics ports moved next to the contender's own.
        return ours, {"SERVE_APP_REPLICA_HTTP": "false",
                      "RAY_SERVE_HAPROXY_STATS_PORT": str(port + 200),
                      "RAY_SERVE_HAPROXY_METRICS_PORT": str(port + 300)}
    if name in ("ray_serve_llm", "ray_serve_llm_haproxy"):
        haproxy = {"RAY_SERVE_ENABLE_HA_PROXY": "1" if name.endswith("haproxy") else "0"}
        return [sys.executable, "-c", _RAY_SERVE_LLM, model_path, str(port), NAME,
                json.dumps(TELEMETRY_OFF_ENV), "eager" if eager else "compiled"], haproxy
    raise ValueError(f"unknown contender {name!r}; known: {', '.join(CONTENDERS)}")


class ProcessTree:
    """Peak summed PSS of a process and all its descendants, over explicit samples, and their
    summed CPU time.

    PSS, not RSS: Ray's dozen processes map the same libraries, and summing RSS would count
    those shared pages once per process. Samples are taken between runs, never during one:
    reading a process's memory map takes its mmap lock, and sampling every second stalled the
    servers under load into bursty, slower streams (both contenders, at random). CPU time
    (``/proc/<pid>/stat``, no lock) is a second view of each side's cost per token; it includes
    vLLM's worker waiting busily for the next step, so a slower run also costs more CPU."""

    def __init__(self, pid: int) -> None:
        self._root = psutil.Process(pid)
        self.peak = 0

    def _procs(self) -> list[psutil.Process]:
        try:
            return [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            return []

    def sample(self) -> int:
        total = 0
        for proc in self._procs():
            try:
                info = proc.memory_full_info()
                total += getattr(info, "pss", info.rss)
            except psutil.Error:
                pass
        self.peak = max(self.peak, total)
        return self.peak

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self._procs():
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total


def _stop_tree(proc: subprocess.Popen[Any]) -> None:
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass


@contextlib.contextmanager
def started(name: str, model_path: str, args: argparse.Namespace, port: int,
            extra: dict[str, str] | None = None) -> Iterator[tuple[str, ProcessTree]]:
    """Contender ``name`` serving on ``port``, answered and settled: ``(url, its process tree)``.
    ``extra`` is more environment for it, over the contender's own."""
    command, extra_env = contender_command(name, model_path, port, args.out, args.enforce_eager)
    env = {**os.environ, **TELEMETRY_OFF_ENV, "VLLM_CPU_KVCACHE_SPACE": "1",
           "SERVE_APP_MODEL_NAME": NAME, **extra_env, **(extra or {})}
    label = getattr(args, "label", None) or name
    log = open(os.path.join(args.out, f"{label}.log"), "w")  # noqa: SIM115 (closed below)
    # Same session as this load generator, as a server started from a shell would be towards
    # its clients. A session of its own puts the server in its own scheduler autogroup (Linux's
    # default), which shares the CPU between groups, not threads: measured here, every
    # contender's streams then came in bursts at c=16, 5x slower, at random.
    # Python puts the working directory first on the import path: the baseline's own tree.
    cwd = getattr(args, "baseline_tree", None) if name == "serve_app_baseline" else None
    if name == "serve_app_baseline" and not cwd:
        raise ValueError("serve_app_baseline needs --baseline-tree PATH (another checkout)")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    memory = ProcessTree(proc.pid)
    try:
        deadline = time.monotonic() + 900
        while True:  # ready = a completion succeeds (routes may answer before the engine does)
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {log.name}")
            try:
                if httpx.post(f"{url}/v1/completions", timeout=30, json={
                        "model": NAME, "prompt": "Hi", "max_tokens": 1}).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; see {log.name}")
            time.sleep(1)
        # Measure the steady state every contender reaches: Ray's agents and Serve's controller
        # finish their start-up work in the first seconds after the app answers.
        time.sleep(args.settle_s)
        memory.sample()
        yield url, memory
    finally:
        _stop_tree(proc)
        log.close()


def measure(name: str, model_path: str, args: argparse.Namespace, tokenizer: Any,
            port: int) -> dict[str, Any]:
    with started(name, model_path, args, port) as (url, memory):
        runs: dict[str, Any] = {}
        cpu: dict[str, dict[str, float]] = {}
        per_run = sum(args.concurrency) * args.n_repeats
        for i, stream in enumerate(args.modes):
            # Fresh prompts for every request of every run, the same for every contender: a
            # reused prompt would be served from vLLM's prefix cache and measure nothing.
            def fresh(n: int, seed: int) -> list[str]:
                return build_prompts(n, args.prompt_size, tokenizer,
                                     unique=not args.same_prompt, seed=seed)

            # Warm-up outside the measurement (first requests pay for lazy initialisation).
            asyncio.run(run_bench(url, concurrencies=[2], n_repeats=1, prompts=fresh(2, 1000 + i),
                                  max_tokens=8, model=NAME, stream=stream, progress=False))
            prompts = fresh(per_run, i)
            cpu_before = memory.cpu_seconds()
            results = asyncio.run(run_bench(
                url, concurrencies=args.concurrency, n_repeats=args.n_repeats, prompts=prompts,
                max_tokens=args.max_tokens, model=NAME, stream=stream,
                progress=not args.no_progress))
            mode = "stream" if stream else "unary"
            runs[mode] = summary(results)
            cpu[mode] = {"cpu_s": memory.cpu_seconds() - cpu_before,
                         "generated_tokens": sum(r.generated_tokens for r in results)}
            memory.sample()  # KV cache and buffers are at their high-water mark after a run
        return {"runs": runs, "memory": memory.peak, "cpu": cpu}


def compare(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    os.makedirs(args.out, exist_ok=True)
    model_path = model_path_for(args.compare_model, DEFAULT_CACHE_DIR)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    modes = [m.strip() for m in args.modes.split(",")]
    args.modes = [False] if args.no_stream else [m == "stream" for m in modes]
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    print(f"# compare on {args.compare_model}: prompt={args.prompt_size} tokens, "
          f"max_tokens={args.max_tokens}, concurrency={args.concurrency}, "
          f"repeats={args.n_repeats}, prompts={'identical' if args.same_prompt else 'random prefix'}, "
          f"vLLM {'eager' if args.enforce_eager else 'compiled'}")
    measured = {}
    for i, name in enumerate(names):
        print(f"## {name}", flush=True)
        measured[name] = measure(name, model_path, args, tokenizer, port=18000 + i)
    print_comparison(measured, names[0])
    path = Path(args.out) / "compare.json"
    path.write_text(json.dumps({"model": args.compare_model, "measured": measured}, indent=2))
    print(f"wrote {path}")


def print_comparison(measured: dict[str, Any], base: str) -> None:
    for mode in measured[base]["runs"]:
        print(f"\n### {mode}: system tok/s (ratio to {base}), TTFT p50 ms, per-request gen tok/s")
        header = ["conc"] + [f"{n:>36}" for n in measured]
        print(" ".join(header))
        for c, ref in measured[base]["runs"][mode].items():
            cells = [f"{c:>4}"]
            for name in measured:
                row = measured[name]["runs"][mode][c]
                ratio = row["system_tps"] / ref["system_tps"] if ref["system_tps"] else 0
                cell = (f"{row['system_tps']:8.1f} ({ratio:4.2f}x) {row['ttft_p50'] * 1000:7.0f}ms "
                        f"{row['generated_tps']:6.1f}")
                cells.append(cell.rjust(36))
                if row["errors"]:
                    cells[-1] += f" !{row['errors']:.0f} errors"
            print(" ".join(cells))
    print("\n### server CPU seconds per 1,000 generated tokens (every process of each side, "
          "whole run; lower is better)")
    for mode in measured[base].get("cpu", {}):
        cells = []
        ref = cpu_per_1k(measured[base]["cpu"][mode])
        for name, m in measured.items():
            value = cpu_per_1k(m.get("cpu", {}).get(mode, {}))
            cells.append(f"{name} {value:.3f} ({value / ref if ref else 0:4.2f}x)")
        print(f"{mode:>7}: " + ", ".join(cells))
    base_mem = measured[base]["memory"]
    print("\n### memory (peak PSS of the whole process tree)")
    for name, m in measured.items():
        print(f"{name:>14}: {m['memory'] / 2**30:5.2f} GiB ({m['memory'] / base_mem:4.2f}x)")


def cpu_per_1k(cpu: dict[str, float]) -> float:
    tokens = cpu.get("generated_tokens", 0)
    return 1000 * cpu["cpu_s"] / tokens if tokens else 0.0
