"""deploy/oci.md: every `ray`, `serve`, `python -m infra.oci` and `python -m serve_app status`
command it gives parses with the real CLI, every flag it names exists, every file it names is
in the repo."""
from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import click
import pytest
import yaml
from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME
from ray.scripts.scripts import cli as ray_cli
from ray.serve.scripts import cli as serve_cli

from infra.oci.cli import build_parser
from serve_app import licensing

ROOT = Path(__file__).resolve().parents[2]
GUIDE = (ROOT / "deploy" / "oci.md").read_text()
CLUSTER = yaml.safe_load((ROOT / "infra" / "oci" / "ray_cluster.yaml").read_text())
PREFIXES = ("ray ", "serve ", "python -m infra.oci", "python -m serve_app")


def block_commands() -> list[str]:
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", GUIDE, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith(PREFIXES):
                commands.append(line.strip())
    return commands


def inline_commands() -> list[str]:
    return [s for s in re.findall(r"`([^`\n]+)`", GUIDE) if s.startswith(PREFIXES)]


def click_options(command: click.Command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}


def argparse_options(parser) -> set[str]:
    options = {o for a in parser._actions for o in a.option_strings}
    for action in parser._actions:
        for sub in (getattr(action, "choices", None) or {}).values():
            if hasattr(sub, "_actions"):
                options |= argparse_options(sub)
    return options


def status_options() -> set[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        licensing.status(["--help"])
    return set(re.findall(r"--[a-z][\w-]*", out.getvalue()))


def check(command: str, *, complete: bool) -> None:
    """Parse `command` with its CLI: completely (blocks, meant to be pasted) or only its
    subcommand and flags (prose, which may leave arguments out)."""
    words = shlex.split(command)
    if words[0] in ("ray", "serve"):
        group = ray_cli if words[0] == "ray" else serve_cli
        assert words[1] in group.commands, f"{words[0]} has no {words[1]!r}: {command}"
        sub = group.commands[words[1]]
        unknown = {w.split("=")[0] for w in words[2:] if w.startswith("-")} - click_options(sub)
        assert not unknown, f"{command}: no such option {unknown}"
        if complete:
            ctx = sub.make_context(words[1], words[2:])
            inner = ctx.params.get("cmd")
            if inner and inner.startswith(PREFIXES):
                check(inner, complete=True)
    elif words[:3] == ["python", "-m", "infra.oci"]:
        if complete:
            try:
                build_parser().parse_args(words[3:])
            except SystemExit as exc:
                pytest.fail(f"{command}: python -m infra.oci refuses it ({exc})")
        else:
            unknown = {w for w in words[3:] if w.startswith("-")} - argparse_options(
                build_parser())
            assert not unknown, f"{command}: no such option {unknown}"
    elif words[:4] == ["python", "-m", "serve_app", "status"]:
        unknown = {w for w in words[4:] if w.startswith("-")} - status_options()
        assert not unknown, f"{command}: no such option {unknown}"
    elif words[:3] == ["python", "-m", "serve_app.config_reference"]:
        assert (ROOT / "serve_app" / "config_reference.py").is_file()
    else:
        pytest.fail(f"no check for {command!r}")


def test_block_commands_parse_with_the_real_clis():
    commands = block_commands()
    assert {c.split()[1] for c in commands if c.startswith("ray ")} >= {
        "up", "exec", "down", "dashboard", "get-head-ip", "monitor", "get-auth-token"}
    assert any(c.startswith("python -m infra.oci security-list") for c in commands)
    assert any(c.startswith("python -m infra.oci check") for c in commands)
    assert any(c.startswith("python -m serve_app status") for c in commands)
    assert any("serve deploy" in c for c in commands)
    for command in commands:
        check(command, complete=True)


def test_prose_commands_and_flags_exist():
    for command in inline_commands():
        check(command, complete=False)
    known = (argparse_options(build_parser()) | status_options()
             | {o for c in ray_cli.commands.values() for o in click_options(c)}
             | {o for c in serve_cli.commands.values() for o in click_options(c)})
    flags = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", GUIDE)) - {"--"}
    assert flags - known == set()


def test_a_misspelt_flag_would_be_caught():
    with pytest.raises(AssertionError):
        check("ray up infra/oci/ray_cluster.yaml --yes-please", complete=True)
    with pytest.raises(pytest.fail.Exception):
        check("python -m infra.oci security-list x --client-cidr 1.2.3.0/24", complete=True)
    with pytest.raises(click.UsageError):
        check("ray exec infra/oci/ray_cluster.yaml", complete=True)


def test_files_extras_and_names_the_guide_relies_on():
    paths = re.findall(r"((?:infra|deploy|serve_app)/[\w/.-]+\.(?:yaml|py|md))", GUIDE)
    assert "infra/oci/ray_cluster.yaml" in paths
    for path in paths:
        # serve_app/infra/...: the checkout in the head's home, as `ray exec` sees it.
        local = path.removeprefix("serve_app/") if path.startswith("serve_app/infra/") else path
        assert (ROOT / local).is_file(), path
    # `ray exec` runs on the head, whose home has this checkout at ~/serve_app.
    assert CLUSTER["file_mounts"]["~/serve_app"] == "."
    assert "serve deploy serve_app/infra/oci/serve_config.yaml" in GUIDE
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^oci = \["oci', pyproject, re.M) and 'pip install -e ".[oci]"' in GUIDE
    assert f"`{TAG_RAY_CLUSTER_NAME}: {CLUSTER['cluster_name']}`" in GUIDE
    assert CLUSTER["auth"]["ssh_private_key"] == "~/.ssh/id_ed25519" and "id_ed25519" in GUIDE
