"""The bfloat16-weight decode kernel (serve_app.kernels.bf16_weights), built with this machine's
compiler, behind vLLM's CPU linear dispatch as the fence installs it: one and two rows through
the kernel, more through vLLM's oneDNN handler, both against float32 ``F.linear``; matrices
bfloat16 does not hold exactly, or not in whole blocks, left to vLLM."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from serve_app import vllm_internals
from serve_app.kernels import bf16_weights
from serve_app.precision import cpu_flags

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not bf16_weights.cpu_supports(cpu_flags()),
                                reason="the kernel needs AVX2 and FMA")


class Layer(torch.nn.Module):
    """What vLLM's dispatch is given: a module with a 2-D ``weight`` parameter."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)


def bf16_valued(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16).to(torch.float32)


@pytest.fixture(scope="module")
def built() -> None:
    assert bf16_weights.load(), "the kernel did not build (see the warning logged)"


@pytest.mark.parametrize("rows", [1, 2, 3, 16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_dispatched_linear_matches_float32(built, rows, with_bias):
    weight = bf16_valued(968, 576, seed=rows)  # 121 blocks of 8 rows: an odd block count
    expected_weight = weight.clone()
    layer = Layer(weight)
    assert vllm_internals.bf16_weight_linear(layer, remove_weight=True)
    assert layer.weight.numel() == 0  # vLLM's oneDNN branch drops it too: the handler holds it
    gen = torch.Generator().manual_seed(100 + rows)
    x = torch.randn(rows, 576, generator=gen)
    bias = torch.randn(968, generator=gen) if with_bias else None
    got = layer.cpu_linear(x, layer.weight, bias)
    want = torch.nn.functional.linear(x.double(), expected_weight.double(),
                                      None if bias is None else bias.double())
    assert got.shape == (rows, 968) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_leading_dimensions_are_kept(built):
    layer = Layer(bf16_valued(64, 128, seed=7))
    weight = layer.weight.data.clone()
    assert vllm_internals.bf16_weight_linear(layer, remove_weight=False)
    x = torch.randn(1, 1, 128)
    out = layer.cpu_linear(x, layer.weight, None)
    assert out.shape == (1, 1, 64)
    torch.testing.assert_close(out, x @ weight.t(), rtol=1e-5, atol=1e-5)


def test_matrices_the_kernel_does_not_fit_are_left_to_vllm(built):
    not_bf16 = Layer(torch.randn(64, 128))  # float32 values bfloat16 would round
    ragged = Layer(bf16_valued(60, 128, seed=1))  # 60 rows: not whole blocks of 8
    half = Layer(bf16_valued(64, 128, seed=2).to(torch.bfloat16))
    for layer in (not_bf16, ragged, half):
        before = layer.weight.data.clone()
        assert not vllm_internals.bf16_weight_linear(layer, remove_weight=True)
        assert not hasattr(layer, "cpu_linear") and torch.equal(layer.weight.data, before)


@pytest.mark.parametrize("on", ["1", "0"])
def test_the_plugin_takes_the_dispatch_only_when_the_engine_environment_says_so(on):
    probe = ("from serve_app import vllm_internals\n"
             "from vllm.model_executor.layers import utils\n"
             "vllm_internals.bf16_weight_plugin()\n"
             "print(getattr(utils.dispatch_cpu_unquantized_gemm, 'serve_app', False))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=300, env={**os.environ, bf16_weights.ENV: on})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == str(on == "1")


def test_the_kernel_runs_on_torch_s_own_openmp_threads(built):
    # One sequential stream per thread reads a fraction of the bandwidth (one core's), so the
    # kernel must split its rows over every engine thread, in the OpenMP pool torch already runs:
    # it calls OpenMP, and needs no OpenMP runtime of its own beside torch's.
    maps = open("/proc/self/maps").read().split("\n")
    kernel = next(line.split()[-1] for line in maps if "serve_app_bf16_weights" in line)
    undefined = subprocess.run(["nm", "-D", "--undefined-only", kernel], capture_output=True,
                               text=True, check=True).stdout
    assert "GOMP_parallel" in undefined
    headers = subprocess.run(["objdump", "-p", kernel], capture_output=True, text=True,
                             check=True).stdout
    needed = [line.split()[-1] for line in headers.splitlines() if "NEEDED" in line]
    assert "libtorch_cpu.so" in needed and not any("gomp" in n for n in needed), needed
