"""Which precision the engine runs on CPU, and the accuracy gate a half-precision path must pass.

Decoding reads every weight once per step, so half precision would halve a step's bytes. On CPU
it is a fast path only where the cores compute it natively (AMX or AVX512-BF16 for bfloat16):
without them vLLM's oneDNN refuses bfloat16 matrices and vLLM falls back to torch's, which
converts on the fly, so a batch of 16 decodes many times slower than in float32
(docs/performance.md). Where it is fast it must also answer right: the gate runs the fast path
and float32 greedily on ``GATE_PROMPTS`` and counts the prompts whose first ``GATE_TOKENS``
tokens agree, ``GATE_MIN_MATCHES`` of 20 to pass.

SmolLM2-135M fails it in bfloat16 everywhere it was run (docs/performance.md has the counts):
transformers' own bfloat16 already loses 3 of 20 prompts (a small model's greedy choices are
near ties that an 8-bit mantissa flips), vLLM's CPU kernels lose more (its attention and rotary
kernels round intermediates: ``docs/repro/bf16_cpu_kernels.py``), and on AMX vLLM's bfloat16
answers wrong from the first tokens. So ``auto`` is float32 on every CPU: ``GATE_PASSED`` lists
the half precisions whose gate passed with the pinned vLLM, none yet, and
``tests/e2e/test_precision_gate.py`` runs the gate wherever it runs and fails if ``auto`` would
pick a precision that fails it there. An explicit ``dtype: bfloat16`` still runs it.

The other fast path keeps float32 and reads the weights as bfloat16 at one or two streams
(``kernels.bf16_weights``): SmolLM2's float32 weights are bfloat16 values, so
no weight changes and only the kernel's summation order differs from vLLM's. It passes the gate
(20 of 20 here; the e2e test requires it, in CI), and is on by default: at one stream it
doubles the decode rate (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Chat prompts of the kinds the product answers: facts, arithmetic, lists, code, rewriting,
# several languages. Fixed, so the gate's verdicts compare across machines and releases.
GATE_PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 times 7?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water in Celsius?",
    "Write a Python function that returns the square of a number.",
    "Who wrote Romeo and Juliet?",
    "List the days of the week.",
    "What does a CPU do?",
    "Give me a synonym for 'happy'.",
    "How many legs does a spider have?",
    "Summarize the plot of Cinderella in two sentences.",
    "What is the largest planet in our solar system?",
    "Qual é a capital do Brasil?",
    "Rewrite this sentence politely: Give me the report now.",
    "What is the square root of 81?",
    "Describe a cat to someone who has never seen one.",
    "Why is the sky blue?",
)
GATE_TOKENS = 16
GATE_MIN_MATCHES = 18


@dataclass(frozen=True)
class GateResult:
    """How many prompts' first ``tokens`` greedy tokens agree with float32's."""

    matches: int
    prompts: int
    tokens: int
    need: int
    diverged: tuple[int, ...]  # indexes of the prompts that disagree

    @property
    def passed(self) -> bool:
        return self.matches >= self.need


def gate(reference: Sequence[Sequence[int]], fast: Sequence[Sequence[int]],
         tokens: int = GATE_TOKENS, need: int = GATE_MIN_MATCHES) -> GateResult:
    """Compare greedy token ids of float32 (``reference``) and of the fast path, per prompt."""
    if len(reference) != len(fast):
        raise ValueError(f"{len(reference)} reference outputs for {len(fast)} fast ones")
    diverged = tuple(i for i, (r, f) in enumerate(zip(reference, fast, strict=True))
                     if list(r[:tokens]) != list(f[:tokens]))
    return GateResult(matches=len(reference) - len(diverged), prompts=len(reference),
                      tokens=tokens, need=need, diverged=diverged)


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty where there is no such file)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_half_precision(flags: frozenset[str]) -> str | None:
    """The half precision these cores compute natively, None if none: AMX tiles or
    AVX512-BF16 give oneDNN (and vLLM's AMX kernels) real bfloat16 arithmetic."""
    if {"amx_bf16", "avx512_bf16"} & flags:
        return "bfloat16"
    return None


# Half precisions whose gate passed for the embedded model with the pinned vLLM (see above).
GATE_PASSED: frozenset[str] = frozenset()


def auto_cpu_dtype(flags: frozenset[str]) -> str:
    """``dtype: auto`` on CPU: the native half precision if its gate passed, else float32."""
    fast = native_half_precision(flags)
    return fast if fast in GATE_PASSED else "float32"
