"""What the suite needs and lacks is skipped on a developer's machine and fails in CI (.ci/run
sets CI), for vLLM as for PostgreSQL."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import require_vllm


@pytest.fixture
def without_vllm(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real(name, *a))


def test_without_vllm_a_local_run_skips_and_says_why(without_vllm, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="vLLM is missing"):
        require_vllm()


def test_without_vllm_ci_fails(without_vllm, monkeypatch):
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="vLLM is missing, and CI must run every test"):
        require_vllm()
