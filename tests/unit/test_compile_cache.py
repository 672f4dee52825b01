"""vLLM's compile cache loads on CPU (vllm_internals item 11): a graph torch compiled with
inductor and saved, as vLLM's CPU engine saves its model, loads with a ``finalize_loading`` that
vLLM's loader can call, and computes what it computed before. The image layer (tests/image)
checks the engine itself: a restart loads the graph instead of compiling it again."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import require_vllm


def silu_twice_plus_one(x):  # noqa: ANN001, ANN201 (a graph for dynamo to trace)
    import torch

    return torch.nn.functional.silu(x) * 2 + 1


def saved_graph(path: Path):  # noqa: ANN201
    """What vLLM's CPU engine saves: fullgraph, inductor directly, through torch's AOT API."""
    import torch

    x = torch.randn(8, 16)
    compiled = torch.compile(silu_twice_plus_one, fullgraph=True, backend="inductor")
    compiled.aot_compile(((x,), {})).save_compiled_function(str(path))
    return x


def load(path: Path):  # noqa: ANN201
    import torch.compiler

    with path.open("rb") as f:
        return torch.compiler.load_compiled_function(f, f_globals=silu_twice_plus_one.__globals__)


@pytest.fixture
def torch_compiler(monkeypatch):  # noqa: ANN001, ANN201
    """torch.compiler as it was before the test's plugin patched it, at the end."""
    require_vllm()
    import torch.compiler

    monkeypatch.setattr(torch.compiler, "load_compiled_function",
                        torch.compiler.load_compiled_function)
    return torch.compiler


def test_a_saved_cpu_graph_loads_for_vllm_and_computes_the_same(torch_compiler, tmp_path):
    import torch

    from serve_app import vllm_internals

    path = tmp_path / "model"
    x = saved_graph(path)
    # Without the plugin: what made vLLM compile again on every start.
    with pytest.raises(AttributeError, match="finalize_loading"):
        load(path)._artifacts.compiled_fn.finalize_loading(None)

    vllm_internals.aot_cache_plugin()
    patched = torch_compiler.load_compiled_function
    vllm_internals.aot_cache_plugin()  # vLLM loads its plugins in several places: once is all
    assert torch_compiler.load_compiled_function is patched
    loaded = load(path)
    loaded._artifacts.compiled_fn.finalize_loading(None)
    assert torch.equal(loaded(x), silu_twice_plus_one(x))
