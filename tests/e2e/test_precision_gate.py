"""The accuracy gate of the fast paths on this machine's CPU: greedy outputs against float32's on
the fixed prompts, with real vLLM and SmolLM2 (serve_app.precision): the float32 engine reading
bfloat16 copies of the weights (kernels.bf16_weights), and the half precision of these cores.

One child process per engine (vLLM's offline engine leaves multiprocessing's resource tracker
running until its parent exits, and a process runs vLLM's plugins once), each answering the 20
prompts one after the other, one stream, as the bfloat16-weight kernel decodes. A half precision
is picked by ``auto``, and the kernel offered, only where this gate passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve_app.config import DEFAULT_CACHE_DIR, TELEMETRY_OFF_ENV, ModelConfig
from serve_app.kernels import bf16_weights
from serve_app.precision import (
    GATE_PROMPTS,
    GATE_TOKENS,
    cpu_flags,
    gate,
    native_half_precision,
)

pytestmark = pytest.mark.e2e

# Eager: the gate compares numbers, and compiling each engine would triple its cost.
ENGINE = {"enforce_eager": True, "max_model_len": 1024, "kv_cache_memory_bytes": 1 << 29}
# The engine in the child's own process, so that it can say how many matrices the kernel took.
CHILD = """
import json, sys
from serve_app.kernels import bf16_weights
from serve_app.vllm_internals import greedy_chat
path, dtype, on, prompts, tokens, engine = json.loads(sys.argv[1])
out = greedy_chat(path, dtype, prompts, tokens, on, **engine)
print(json.dumps({"outputs": out, "taken": bf16_weights.taken}))
"""


def greedy_outputs(model_path: str, dtype: str, bf16_weight_decode: bool = False
                   ) -> list[list[int]]:
    job = json.dumps([model_path, dtype, bf16_weight_decode, list(GATE_PROMPTS), GATE_TOKENS,
                      ENGINE])
    done = subprocess.run([sys.executable, "-c", CHILD, job], capture_output=True, text=True,
                          timeout=900, env={**os.environ, **TELEMETRY_OFF_ENV,
                                            "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    # SmolLM2: 30 layers of q/k/v, o, gate/up and down, all bfloat16 values, and the tied
    # embedding, which vLLM dispatches twice: as the embedding and as the LM head.
    assert answer["taken"] == (122 if bf16_weight_decode else 0), answer["taken"]
    return answer["outputs"]


@pytest.fixture(scope="module")
def model_path() -> str:
    from serve_app.weights import ensure_smollm2

    return str(ensure_smollm2(Path(DEFAULT_CACHE_DIR)))


@pytest.fixture(scope="module")
def float32(model_path) -> list[list[int]]:
    outputs = greedy_outputs(model_path, "float32")
    assert all(outputs), "float32 answered nothing"
    return outputs


def test_auto_picks_half_precision_only_where_its_gate_passes(model_path):
    auto = ModelConfig(device="cpu").resolved_dtype
    fast = native_half_precision(cpu_flags())
    if fast is None:  # no native half precision here: nothing faster to gate, float32 it is
        assert auto == "float32"
        return
    outputs = {d: greedy_outputs(model_path, d) for d in ("float32", fast)}
    result = gate(outputs["float32"], outputs[fast])
    print(f"gate {fast} vs float32 on this CPU: {result.matches}/{result.prompts} prompts agree "
          f"on their first {result.tokens} tokens; diverged: {list(result.diverged)}")
    assert auto == "float32" or result.passed, (
        f"dtype auto picks {auto}, whose gate fails here: {result}")


@pytest.mark.skipif(not bf16_weights.cpu_supports(cpu_flags()), reason="needs AVX2 and FMA")
def test_bfloat16_weight_decode_passes_the_gate(model_path, float32):
    """The setting is offered (``cpu_bf16_weight_decode``) only because this passes."""
    result = gate(float32, greedy_outputs(model_path, "float32", bf16_weight_decode=True))
    print(f"gate of bfloat16 weight reads vs float32 on this CPU: {result.matches}/"
          f"{result.prompts} prompts agree on their first {result.tokens} tokens; diverged: "
          f"{list(result.diverged)}")
    assert result.passed, result
