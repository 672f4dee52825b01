"""Single-stream decode on CPU reading float32 weights as the bfloat16 values they are.

Decoding one token reads every weight once, so at one stream a step costs the weights' bytes
over the memory bandwidth (``bench.roofline``). SmolLM2's float32 checkpoint holds bfloat16
values (dequantized from its GGUF), so a bfloat16 copy of each matrix is the same weights in
half the bytes. ``bf16_weights.cpp`` multiplies one or two float32 activation rows by that copy
in float32 arithmetic (AVX2 + FMA) and leaves more rows, which are compute-bound, to vLLM's
oneDNN matmul on the float32 weight. Only matrices that bfloat16 holds exactly take it
(``exact``), so no weight changes; summation order does, which the accuracy gate in
``serve_app.precision`` checks.

The kernel is compiled on first use with torch's C++ extension builder (g++, ~30 s), into
``build_dir()``, and loaded from there afterwards. Where it cannot be built the engine keeps
vLLM's float32 path and says why once. torch is imported inside functions: the router and the
driver import this package and must not load it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from serve_app.precision import cpu_flags

logger = logging.getLogger(__name__)

# "1" in the engine's environment turns the kernel on there (``in_engine``); not a setting
# (``ModelConfig.cpu_bf16_weight_decode`` is), so not under the settings' prefix.
ENV = "SERVEAPP_ENGINE_BF16_WEIGHTS"
SOURCE = Path(__file__).with_name("bf16_weights.cpp")
# The packed layout's block: a matrix's rows and columns must be multiples of it.
BLOCK = 8
REQUIRED_FLAGS = frozenset({"avx2", "fma"})

_loaded: bool | None = None
# Matrices this process's engine gave the kernel (vllm_internals.bf16_weight_linear).
taken = 0


def cpu_supports(flags: frozenset[str]) -> bool:
    return REQUIRED_FLAGS <= flags


def build_dir() -> Path:
    import torch

    base = Path(os.environ.get("SERVE_APP_KERNEL_CACHE", Path.home() / ".cache" / "serve_app"))
    return base / "kernels" / f"torch-{torch.__version__}"


@contextlib.contextmanager
def in_engine(on: bool) -> Iterator[None]:
    """The kernel on (or off) in the engine processes vLLM starts within the block: they
    inherit this environment, and vLLM's plugin reads it there."""
    old = os.environ.get(ENV)
    os.environ[ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


def load() -> bool:
    """Build (once) and load the kernel into this process; False, logged, where it cannot."""
    global _loaded
    if _loaded is None:
        _loaded = _build()
    return _loaded


def _build() -> bool:
    if not cpu_supports(cpu_flags()):
        logger.warning("bfloat16-weight decode needs AVX2 and FMA, which these cores lack; "
                       "decoding with vLLM's float32 matmul")
        return False
    try:
        import torch
        from torch.utils.cpp_extension import load as build

        if not hasattr(torch.ops.serve_app, "bf16w_linear"):
            path = build_dir()
            path.mkdir(parents=True, exist_ok=True)
            # ATen's parallel_for is OpenMP inlined from its headers: without -fopenmp it runs
            # on one thread. Linking without it leaves GOMP_* to torch's own libgomp, which
            # libtorch_cpu brings: one OpenMP runtime and one thread pool, bound as vLLM binds.
            build(name="serve_app_bf16_weights", sources=[str(SOURCE)],
                  extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
                  build_directory=str(path), is_python_module=False)
        return True
    except Exception as exc:  # no compiler, no headers: vLLM's own path, said once
        logger.warning("bfloat16-weight decode kernel unavailable (%s); decoding with vLLM's "
                       "float32 matmul", str(exc).strip().splitlines()[-1:] or exc)
        return False


def exact(weight: Any) -> bool:
    """Whether bfloat16 holds every value of this float32 matrix exactly."""
    import torch

    return weight.dtype == torch.float32 and torch.equal(
        weight.to(torch.bfloat16).to(torch.float32), weight)


def fits(weight: Any) -> bool:
    """A 2-D float32 matrix in whole blocks whose values bfloat16 holds exactly."""
    return (weight.ndim == 2 and not weight.is_meta and weight.size(0) % BLOCK == 0
            and weight.size(1) % BLOCK == 0 and exact(weight))


def pack(weight: Any) -> Any:
    import torch

    return torch.ops.serve_app.bf16w_pack(weight)


def linear(out: Any, x: Any, packed: Any, bias: Any, handler_tensor: Any) -> None:
    """``out = x @ weight.T + bias`` for 2-D ``x``: the kernel for one or two rows, vLLM's
    oneDNN handler (``handler_tensor``) for more."""
    import torch

    torch.ops.serve_app.bf16w_linear(out, x, packed, bias, handler_tensor)
