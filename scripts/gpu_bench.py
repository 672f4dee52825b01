"""On a machine with a GPU and ``vllm`` installed: the compare bench and the roofline report in
one go, written to one JSON.

    .venv/bin/python scripts/gpu_bench.py [--out gpu_bench_out] [--model builtin:smollm2-135m-instruct]
        [--concurrency 1,8,16] [--n-repeats 3]

1. ``python -m serve_app.bench --compare --contenders vllm,serve_app``: raw `vllm serve` and
   this app on the same model, same dtype (the checkpoint's on a GPU), streamed and not;
2. ``python -m serve_app.bench --roofline``: the GPU's read bandwidth and FLOP rate (measured on
   the GPU with torch), bytes per decode step, c=1 decode from vLLM's own timings and system
   tok/s at higher concurrency, against their bounds;
3. ``gpu_bench.json`` in ``--out``: both reports, ``nvidia-smi``'s view of the GPU, the versions,
   and the README's prediction for this GPU's bandwidth beside what was measured.

Each step runs in its own process (a GPU freed by one contender is free for the next).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def nvidia_smi() -> list[dict[str, str]]:
    if shutil.which("nvidia-smi") is None:
        return []
    fields = "name,memory.total,driver_version,clocks.max.memory,pcie.link.gen.max"
    out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False).stdout
    return [dict(zip(fields.split(","), (v.strip() for v in line.split(",")), strict=False))
            for line in out.splitlines() if line.strip()]


def bench(argv: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "serve_app.bench", *argv], cwd=ROOT, check=True)


def prediction(roofline: dict) -> dict[str, float]:
    """What the README predicts from the measured bandwidth: one stream at 60-80 % of the
    bandwidth bound for a model large enough that reading weights dominates a step; a small one
    (SmolLM2's 0.27 GB in bfloat16) is held by per-step overhead instead (``README``, GPU)."""
    row = next(iter(roofline["variants"].values()))
    bound = row["decode_bound_tps"]
    return {"decode_bound_tps": bound, "large_model_low": 0.6 * bound,
            "large_model_high": 0.8 * bound, "measured_c1_tps": row["c1_decode_tps"],
            "measured_fraction": row["fraction_of_bound"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_bench_out")
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--concurrency", default="1,8,16")
    p.add_argument("--n-repeats", default="3")
    args = p.parse_args()
    out = Path(args.out).resolve()
    common = ["--compare-model", args.model, "--concurrency", args.concurrency,
              "--n-repeats", args.n_repeats, "--no-progress"]
    bench(["--compare", "--contenders", "vllm,serve_app", "--out", str(out / "compare"),
           *common])
    bench(["--roofline", "--out", str(out / "roofline"), *common])
    compare = json.loads((out / "compare" / "compare.json").read_text())
    roofline = json.loads((out / "roofline" / "roofline.json").read_text())
    report = {"gpus": nvidia_smi(), "compare": compare, "roofline": roofline,
              "prediction": prediction(roofline)}
    path = out / "gpu_bench.json"
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["prediction"], indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
