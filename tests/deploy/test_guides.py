"""The guides against what they describe: every command of deploy/docker.md names files,
images, services, profiles, settings and subcommands that exist; the Colab guide's table names
the notebook's cells; every `python -m ...` command of the README and of deploy/license-server.md
names a subcommand and flags that our own CLIs have."""

from __future__ import annotations

import importlib
import re

import pytest

from license_server.cli import main as license_server_main
from serve_app.config import Settings
from tests.deploy.dockerfiles import COMPOSE, ROOT, compose
from tests.deploy.test_colab import code_cells, notebook
from tests.infra.test_guides import _split, shell_commands

DOCKER_GUIDE = (ROOT / "deploy" / "docker.md").read_text()
COLAB_GUIDE = (ROOT / "deploy" / "colab.md").read_text()
README = (ROOT / "README.md").read_text()
LICENSE_SERVER_GUIDE = (ROOT / "deploy" / "license-server.md").read_text()
AIR_GAPPED_GUIDE = (ROOT / "deploy" / "air-gapped.md").read_text()
API_KEYS_GUIDE = (ROOT / "deploy" / "api-keys.md").read_text()
# `python -m MODULE` -> the function its __main__ calls.
CLIS = {
    "serve_app": "serve_app.cli",
    "serve_app.bench": "serve_app.bench.cli",
    "serve_app.weights.bench": "serve_app.weights.bench",
    "license_server": "license_server.cli",
}
# serve_app.cli.main dispatches these words itself, before its own parser (which has no
# subcommands, so it would take any other word as an unknown positional after --help).
SERVE_APP_COMMANDS = ("status", "usage-log", "manifest", "license", "keys", "usage", "chat")
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


def python_commands(markdown: str) -> list[list[str]]:
    """Every `python -m ...` of ``markdown`` as words after ``python -m``: the commands of its
    ```bash blocks (the guide's ``as_ls X`` is ``python -m license_server X``; a line inside a
    quote that spans lines, such as the body of ``as_ls`` itself, is not a command) and its
    inline code, whose synopsis brackets are dropped."""
    out = []
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            try:
                commands += _split(line)
            except ValueError:
                continue
    for argv in commands:
        if argv[0] == "as_ls":
            out.append(["license_server", *argv[1:]])
        elif argv[0].endswith("python") and argv[1:2] == ["-m"]:
            out.append(argv[2:])
    for span in re.findall(r"`[^`\n]*?python -m ([^`\n]+)`", markdown):
        out.append(re.sub(r"[\[\]]", " ", span).split())
    return out


def check_cli(words: list[str], capsys, tmp_path) -> str:
    """Ask the CLI ``words`` call for the help of the subcommand they name, and check each
    ``--flag`` they use is in it; returns the command as checked (``module subcommand``)."""
    module, rest = words[0], words[1:]
    assert module in CLIS, f"python -m {module}: not one of our CLIs"
    sub = []
    for word in rest:
        if not re.fullmatch(r"[a-z][a-z-]*", word):
            break
        sub.append(word)
    if module == "serve_app" and sub[:1] == ["manifest"]:
        # No help to ask for: make a manifest of a folder, as documented.
        (tmp_path / "config.json").write_text("{}")
        assert importlib.import_module(CLIS[module]).print_manifest([str(tmp_path)]) == 0
        assert '"config.json"' in capsys.readouterr().out
        return "serve_app manifest"
    if module == "serve_app":
        sub = sub[:2] if sub[:1] in (["usage-log"], ["license"], ["keys"]) else sub[:1]
        assert not sub or sub[0] in SERVE_APP_COMMANDS, words
    else:
        sub = sub[:1]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(CLIS[module]).main([*sub, "--help"])
    assert exit_.value.code == 0, f"python -m {' '.join(words)}: refused"
    usage = capsys.readouterr().out
    for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(rest)):
        assert re.search(rf"{re.escape(flag)}\b", usage), f"python -m {' '.join(words)}: {flag}"
    return " ".join([module, *sub])


def test_the_readme_commands_are_our_clis(capsys, tmp_path):
    checked = {check_cli(words, capsys, tmp_path) for words in python_commands(README)}
    assert {"serve_app", "serve_app status", "serve_app usage-log verify",
            "serve_app usage-log resend", "serve_app manifest", "serve_app.bench",
            "serve_app.weights.bench"} <= checked


def test_the_api_keys_guide_commands_are_our_clis(capsys, tmp_path):
    checked = {check_cli(words, capsys, tmp_path) for words in python_commands(API_KEYS_GUIDE)}
    assert {f"serve_app keys {c}" for c in ("create", "list", "rotate", "update", "revoke")} | {
        "serve_app usage", "serve_app chat"} <= checked


def test_the_license_server_guide_commands_are_its_cli(capsys, tmp_path):
    # Its table of commands names them without `python -m license_server`.
    table = LICENSE_SERVER_GUIDE.split("\n## The commands\n")[1].split("\n## ")[0]
    rows = re.findall(r"^\| (.+?) \|", table, re.M)
    listed = [["license_server", *re.sub(r"[\[\]]", " ", span).replace("\\|", "|").split()]
              for cell in rows for span in re.findall(r"`([^`]+)`", cell)]
    checked = {check_cli(words, capsys, tmp_path)
               for words in python_commands(LICENSE_SERVER_GUIDE) + listed}
    commands = {"serve", "issue", "list", "revoke", "usage", "public-key", "rotate-admin-token",
                "publish-model", "models"}
    assert {f"license_server {c}" for c in commands} <= checked


def test_the_air_gapped_guide_commands_are_our_clis(capsys, tmp_path):
    checked = {check_cli(words, capsys, tmp_path) for words in python_commands(AIR_GAPPED_GUIDE)}
    assert {"serve_app license request", "serve_app license import", "serve_app usage-log export",
            "serve_app status", "license_server issue", "license_server activate",
            "license_server import-usage", "license_server installations"} <= checked


@pytest.mark.parametrize("command", [
    "`python -m serve_app status --endpoint URL`",
    "`python -m serve_app usage-log verify --all`",
    "`python -m license_server issue --customers ACME`",
    "`python -m license_server retire LICENSE_ID`",
    "`python -m serve_app stats`",
])
def test_a_wrong_subcommand_or_flag_is_caught(command, capsys, tmp_path):
    (words,) = python_commands(command)
    with pytest.raises(AssertionError):
        check_cli(words, capsys, tmp_path)
