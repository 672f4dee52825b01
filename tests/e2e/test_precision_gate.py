"""The accuracy gate of half precision on this machine's CPU: greedy outputs of the half-precision
path against float32's on the fixed prompts, with real vLLM and SmolLM2 (serve_app.precision).

Two engines, one after the other in one child process (vLLM's offline engine leaves
multiprocessing's resource tracker running until its parent exits), each answering the 20
prompts in one batch. ``dtype: auto`` may pick a half precision only where this gate passes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from serve_app.config import DEFAULT_CACHE_DIR, TELEMETRY_OFF_ENV, ModelConfig
from serve_app.precision import GATE_PROMPTS, GATE_TOKENS, cpu_flags, gate, native_half_precision

pytestmark = pytest.mark.e2e

# Eager: the gate compares numbers, and compiling each engine would triple its cost.
ENGINE = {"enforce_eager": True, "max_model_len": 1024, "kv_cache_memory_bytes": 1 << 29}
CHILD = """
import json, sys
from serve_app.vllm_internals import greedy_chat
path, dtypes, prompts, tokens, engine = json.loads(sys.argv[1])
print(json.dumps({d: greedy_chat(path, d, prompts, tokens, **engine) for d in dtypes}))
"""


def greedy_outputs(model_path: str, dtypes: list[str]) -> dict[str, list[list[int]]]:
    import os

    job = json.dumps([model_path, dtypes, list(GATE_PROMPTS), GATE_TOKENS, ENGINE])
    done = subprocess.run([sys.executable, "-c", CHILD, job], capture_output=True, text=True,
                          timeout=900, env={**os.environ, **TELEMETRY_OFF_ENV})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_auto_picks_half_precision_only_where_its_gate_passes():
    from serve_app.weights import ensure_smollm2

    model_path = str(ensure_smollm2(Path(DEFAULT_CACHE_DIR)))
    fast = native_half_precision(cpu_flags()) or "bfloat16"
    outputs = greedy_outputs(model_path, ["float32", fast])
    result = gate(outputs["float32"], outputs[fast])
    print(f"gate {fast} vs float32 on this CPU: {result.matches}/{result.prompts} prompts agree "
          f"on their first {result.tokens} tokens; diverged: {list(result.diverged)}")
    assert all(outputs["float32"]), "float32 answered nothing"
    auto = ModelConfig(device="cpu").resolved_dtype
    assert auto == "float32" or result.passed, (
        f"dtype auto picks {auto}, whose gate fails here: {result}")
