"""The roofline report's arithmetic: bytes per decode step, FLOPs per token, vLLM's decode
counters and the variants' syntax (serve_app.bench.roofline)."""

from __future__ import annotations

import json
import struct

import pytest

from serve_app.bench.roofline import (
    Bounds,
    ModelShape,
    decode_tps,
    engine_counters,
    parse_variant,
    safetensors_shapes,
)

SMOLLM2 = {"num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
           "hidden_size": 576, "num_hidden_layers": 30, "tie_word_embeddings": True}


def write_checkpoint(folder, config, shapes):
    header = json.dumps({name: {"dtype": "BF16", "shape": shape, "data_offsets": [0, 0]}
                         for name, shape in shapes.items()}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    (folder / "config.json").write_text(json.dumps(config))


def test_shape_from_folder_reads_headers_and_config(tmp_path):
    write_checkpoint(tmp_path, SMOLLM2, {"model.embed_tokens.weight": [49152, 576],
                                         "model.layers.0.mlp.down_proj.weight": [576, 1536],
                                         "model.norm.weight": [576]})
    shape = ModelShape.from_folder(tmp_path)
    assert shape.params == 49152 * 576 + 576 * 1536 + 576
    assert shape.embedding_params == 49152 * 576
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.tied_embeddings) == (
        30, 3, 64, True)
    assert safetensors_shapes(tmp_path)["model.norm.weight"] == [576]


def test_bytes_per_step_count_a_tied_embedding_once_and_the_kv_cache():
    tied = ModelShape(params=1000, embedding_params=300, tied_embeddings=True, layers=2,
                      kv_heads=3, head_dim=4, attention_heads=6)
    untied = ModelShape(params=1300, embedding_params=300, tied_embeddings=False, layers=2,
                        kv_heads=3, head_dim=4, attention_heads=6)
    # A tied table is read whole by the LM head; an untied one's lookup reads a row.
    assert tied.weight_bytes_per_step(4) == 4000
    assert untied.weight_bytes_per_step(2) == 2000
    assert tied.kv_bytes_per_token(2) == 2 * 2 * 3 * 4 * 2
    assert tied.decode_bytes(4, context=10) == 4000 + 10 * 2 * 2 * 3 * 4 * 4
    assert tied.flops_per_token(context=10) == 2 * 1000 + 4 * 2 * 6 * 4 * 10
    bounds = Bounds(bandwidth_gbs=20.0, flops=1e11, decode_bytes=5e8, flops_per_token=2.5e8)
    assert bounds.decode_tps == pytest.approx(40.0)
    assert bounds.compute_tps == pytest.approx(400.0)


def test_decode_rate_from_vllms_counters():
    page = "\n".join([
        "# HELP vllm:request_decode_time_seconds ...",
        'vllm:request_decode_time_seconds_sum{engine="0",model_name="m"} 2.5',
        'vllm:request_decode_time_seconds_count{engine="0",model_name="m"} 3.0',
        'vllm:request_generation_tokens_sum{engine="0",model_name="m"} 40.0',
        'vllm:request_generation_tokens_count{engine="0",model_name="m"} 3.0',
    ])
    before = engine_counters(page)
    after = engine_counters(page.replace(" 2.5", " 7.5").replace("_count{engine=\"0\","
                                                                  "model_name=\"m\"} 3.0",
                                                                  "_count{engine=\"0\","
                                                                  "model_name=\"m\"} 5.0", 1)
                            .replace(" 40.0", " 340.0"))
    # Two requests of 150 tokens: 298 tokens after their first ones, in 5 s.
    assert decode_tps(before, after) == pytest.approx(298 / 5.0)
    assert decode_tps(before, before) == 0.0


def test_variants_are_a_label_and_environment():
    assert parse_variant("before:SERVE_APP_DTYPE=float32, VLLM_X=1") == (
        "before", {"SERVE_APP_DTYPE": "float32", "VLLM_X": "1"})
    assert parse_variant("plain") == ("plain", {})
    with pytest.raises(ValueError):
        parse_variant("bad:NOVALUE")
