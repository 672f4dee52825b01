"""Kernels of our own for vLLM's CPU engine, loaded into the engine's process by the vLLM plugin
in ``vllm_internals`` (``bf16_weights``: single-stream decode reading bfloat16 weights)."""
