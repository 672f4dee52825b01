from __future__ import annotations

import pytest

from serve_app.errors import ConfigError
from serve_app.models import resolve_model, smollm2_gguf_path


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
