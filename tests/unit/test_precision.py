"""The accuracy gate's rule and the CPU dtype that `auto` picks (serve_app.precision)."""

from __future__ import annotations

from serve_app import precision
from serve_app.config import ModelConfig
from serve_app.precision import (
    GATE_MIN_MATCHES,
    GATE_PROMPTS,
    GATE_TOKENS,
    auto_cpu_dtype,
    cpu_flags,
    gate,
    native_half_precision,
)


def test_the_gate_is_twenty_prompts_sixteen_tokens_eighteen_matches():
    assert (len(GATE_PROMPTS), len(set(GATE_PROMPTS)), GATE_TOKENS, GATE_MIN_MATCHES) == (
        20, 20, 16, 18)


def test_gate_counts_prompts_whose_first_tokens_agree():
    reference = [[1, 2, 3, 4]] * 20
    fast = [[1, 2, 3, 4]] * 18 + [[1, 2, 9, 4], [1, 2, 3, 4, 5]]
    result = gate(reference, fast, tokens=4)
    assert (result.matches, result.diverged, result.passed) == (19, (18,), True)
    assert not gate(reference, [[1, 9]] * 3 + [[1, 2, 3, 4]] * 17, tokens=4).passed
    # Past the compared tokens, outputs may differ; a shorter output (an early EOS) differs.
    assert gate([[1, 2, 3]], [[1, 2, 3, 7]], tokens=3, need=1).passed
    assert not gate([[1, 2, 3]], [[1, 2]], tokens=3, need=1).passed


def test_native_half_precision_needs_amx_or_avx512_bf16():
    assert native_half_precision(frozenset({"avx2", "fma", "f16c"})) is None
    assert native_half_precision(frozenset({"avx512f", "avx512_bf16"})) == "bfloat16"
    assert native_half_precision(frozenset({"amx_tile", "amx_bf16"})) == "bfloat16"


def test_auto_stays_float32_where_no_half_precision_passed_its_gate(monkeypatch):
    amx = frozenset({"amx_tile", "amx_bf16", "avx512_bf16"})
    assert auto_cpu_dtype(amx) == "float32"
    assert auto_cpu_dtype(frozenset({"avx2"})) == "float32"
    monkeypatch.setattr(precision, "GATE_PASSED", frozenset({"bfloat16"}))
    assert auto_cpu_dtype(amx) == "bfloat16"
    assert auto_cpu_dtype(frozenset({"avx2"})) == "float32"  # no native bf16: not faster
    assert ModelConfig(device="gpu").resolved_dtype == "auto"
    assert ModelConfig(device="cpu", dtype="bfloat16").resolved_dtype == "bfloat16"


def test_cpu_flags_reads_linux_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\nbogomips\t: 1\n")
    assert cpu_flags(str(info)) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_bf16_weight_decode_by_default_only_for_a_float32_engine_on_cpu():
    assert ModelConfig(device="cpu").bf16_weight_decode
    assert not ModelConfig(device="cpu", cpu_bf16_weight_decode=False).bf16_weight_decode
    # Only float32 engines on CPU read float32 weights as bfloat16.
    assert not ModelConfig(device="cpu", dtype="bfloat16",
                           cpu_bf16_weight_decode=True).bf16_weight_decode
    assert not ModelConfig(device="gpu", cpu_bf16_weight_decode=True).bf16_weight_decode
