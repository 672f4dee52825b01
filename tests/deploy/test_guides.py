"""deploy/docker.md and deploy/colab.md against what they describe: every command names files,
images, services, profiles, settings and subcommands that exist; the Colab guide's table names
the notebook's cells."""

from __future__ import annotations

import re

import pytest

from license_server.cli import main as license_server_main
from serve_app.config import Settings
from tests.deploy.dockerfiles import COMPOSE, ROOT, compose
from tests.deploy.test_colab import code_cells, notebook
from tests.infra.test_guides import shell_commands

DOCKER_GUIDE = (ROOT / "deploy" / "docker.md").read_text()
COLAB_GUIDE = (ROOT / "deploy" / "colab.md").read_text()
SETTINGS_ENV = {f"SERVE_APP_{name.upper()}" for name in Settings.model_fields}


def docker_commands(prefix: list[str]) -> list[list[str]]:
    return [argv for argv in shell_commands(DOCKER_GUIDE) if argv[:len(prefix)] == prefix]


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == option]


def test_build_commands_name_the_dockerfiles_and_compose_images():
    images = {s["build"]["dockerfile"]: s["image"] for s in compose()["services"].values()}
    builds = docker_commands(["docker", "build"])
    assert len(builds) == 2
    for argv in builds:
        (dockerfile,) = option_values(argv, "-f")
        (tag,) = option_values(argv, "-t")
        assert (ROOT / dockerfile).is_file() and images[dockerfile] == tag
        assert argv[-1] == "."  # the build context is the repository's root


def test_run_commands_use_real_settings_and_the_images_volumes():
    runs = docker_commands(["docker", "run"])
    assert len(runs) == 3
    images = {s["image"] for s in compose()["services"].values()}
    for argv in runs:
        assert argv[-1] in images and "--init" in argv and "--shm-size" in " ".join(argv)
        for name in option_values(argv, "-e"):
            assert name.split("=")[0] in SETTINGS_ENV, name
        mounts = [v.split(":")[1] for v in option_values(argv, "-v")]
        assert {"/data", "/home/app/.cache"} <= set(mounts)


def test_compose_commands_name_real_services_profiles_and_subcommands(capsys):
    spec = compose()
    profiles = {p for s in spec["services"].values() for p in s.get("profiles", [])}
    commands = docker_commands(["docker", "compose"])
    assert commands
    for argv in commands:
        for profile in option_values(argv, "--profile"):
            assert profile in profiles
        if "exec" in argv:
            service = argv[argv.index("exec") + 1]
            assert service in spec["services"]
            inner = argv[argv.index("exec") + 2:]
            if inner[:3] == ["python", "-m", "license_server"]:
                with pytest.raises(SystemExit) as exit_:
                    license_server_main([inner[3], "--help"])
                assert exit_.value.code == 0
                usage = capsys.readouterr().out
                for word in inner[4:]:
                    if word.startswith("--"):
                        assert word in usage, word
            else:
                assert inner[:4] == ["python", "-m", "serve_app", "status"], inner
    assert {"cpu", "gpu"} <= {p for argv in commands for p in option_values(argv, "--profile")}
    assert COMPOSE.name in DOCKER_GUIDE


def test_docker_guide_says_how_the_images_are_checked():
    """The guide lists what is checked, by tests that exist: the image layer that builds and
    runs the CPU image, and the checks without a daemon."""
    section = DOCKER_GUIDE.split("## How the images are checked")[1].split("\n## ")[0]
    for test in ("tests/image", "tests/deploy/test_docker.py"):
        assert f"`{test}`" in section or f"{test}`" in section, test
        assert (ROOT / test).exists()
    assert "deploy/docker/build-offline.sh" in section
    assert (ROOT / "deploy" / "docker" / "build-offline.sh").is_file()


def test_colab_guide_names_the_notebook_cells_in_order():
    titles = [re.match(r"#@title (\d+\. [^{\n]+)", c.source).group(1).strip()
              for c in code_cells(notebook())]
    assert re.findall(r"^\| (\d+\. [^|]+?) \|", COLAB_GUIDE, re.M) == titles
