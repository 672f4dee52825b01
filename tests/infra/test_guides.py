"""The deployment guides' commands, parsed by the CLIs they call: no flag, subcommand or file that
does not exist. `ray`/`serve` through their click commands (which parse offline), our own CLIs
through their argparse parsers; `ray exec CONFIG "..."` and `$(...)` are checked inside too."""

from __future__ import annotations

import re
import shlex

import click
import pytest
import tomllib
from ray.scripts.scripts import cli as ray_cli
from ray.serve.scripts import cli as serve_cli

from infra import cluster_yaml
from infra.gcp.cli import parser as gcp_parser
from serve_app.bench import cli as bench
from serve_app.licensing import status as serve_app_status
from tests.infra.test_cluster_yaml import ROOT

GUIDES = [ROOT / "deploy" / "gcp.md", ROOT / "deploy" / "on-prem.md"]
_SUBSTITUTION = re.compile(r"\$\(([^()]*)\)")


def shell_commands(markdown: str) -> list[list[str]]:
    """Simple commands of the ```bash blocks (heredoc bodies skipped), as argv lists."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        block = re.sub(r"<<'EOF'\n.*?\n\s*EOF\n", "\n", block, flags=re.S).replace("\\\n", " ")
        for line in block.splitlines():
            commands += _split(line)
    return commands


def _split(line: str) -> list[list[str]]:
    out = []
    for inner in _SUBSTITUTION.findall(line):
        out += _split(inner)
    lexer = shlex.shlex(_SUBSTITUTION.sub("SUBSTITUTED", line), posix=True,
                        punctuation_chars=";&|")
    lexer.whitespace_split = True
    command: list[str] = []
    for word in list(lexer) + [";"]:
        if word in (";", "&&", "||", "|"):
            if command:
                out.append(command)
            command = []
        else:
            command.append(word)
    for argv in list(out):
        if argv[:2] == ["ray", "exec"]:
            out += _split(argv[3])
    return out


def parse_click(group: click.Group, argv: list[str]) -> None:
    ctx = click.Context(group, info_name=group.name)
    name, command, rest = group.resolve_command(ctx, argv)
    if isinstance(command, click.Group):
        return parse_click(command, rest)
    command.make_context(name, rest, parent=ctx)


def parse_argparse(parser, argv: list[str]) -> None:
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{parser.prog} {' '.join(argv)}: refused ({exc})")


def check(argv: list[str], capsys) -> str | None:
    """Parse one command with the CLI it calls; return which CLI, or None if it is not ours."""
    for word in argv:
        if word.endswith(".yaml") and " " not in word:
            # The head has this checkout at ~/serve_app (file_mounts).
            assert (ROOT / word.removeprefix("serve_app/")).is_file(), word
    if argv[0] == "ray":
        parse_click(ray_cli, argv[1:])
    elif argv[0] == "serve":
        parse_click(serve_cli, argv[1:])
    elif argv[:3] == ["python", "-m", "infra.gcp"]:
        parse_argparse(gcp_parser(), argv[3:])
    elif argv[:3] == ["python", "-m", "infra.cluster_yaml"]:
        parse_argparse(cluster_yaml.parser(), argv[3:])
    elif argv[:3] == ["python", "-m", "serve_app.bench"]:
        parse_argparse(bench.parser(), argv[3:])
    elif argv[:4] == ["python", "-m", "serve_app", "status"]:
        with pytest.raises(SystemExit):
            serve_app_status(["--help"])
        usage = capsys.readouterr().out
        for word in argv[4:]:
            if word.startswith("--"):
                assert re.search(rf"{re.escape(word.split('=')[0])}\b", usage), word
    elif "pip" in argv[0] and "install" in argv:
        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
            "optional-dependencies"]
        for word in argv:
            for extra in re.findall(r"^\.\[(.*)\]$", word):
                assert set(extra.split(",")) <= set(extras), word
    else:
        return None
    return argv[0]


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.name)
def test_every_command_parses(guide, capsys):
    commands = shell_commands(guide.read_text())
    checked = [" ".join(argv) for argv in commands if check(argv, capsys)]
    # Each guide walks through the whole path with commands that were really checked.
    for needed in ("ray up", "ray exec", "serve deploy", "python -m serve_app status",
                   "ray dashboard", "ray down"):
        assert any(c.startswith(needed) for c in checked), needed


def test_gcp_guide_runs_the_preflight_and_the_firewall():
    commands = [" ".join(a) for a in shell_commands((ROOT / "deploy" / "gcp.md").read_text())]
    assert any(c.startswith("python -m infra.gcp check") for c in commands)
    assert any(c.startswith("python -m infra.gcp firewall") for c in commands)


@pytest.mark.parametrize("command", [
    "ray up ray_cluster.yaml --yes --no-such-flag",
    "ray exec ray_cluster.yaml 'serve deploy deploy/serve_config_cluster.yaml --bogus'",
    "ray no-such-command ray_cluster.yaml",
])
def test_a_wrong_flag_is_caught(command, capsys):
    with pytest.raises(click.UsageError):
        for argv in _split(command):
            check(argv, capsys)


def test_a_wrong_flag_of_our_own_clis_is_caught(capsys):
    with pytest.raises(pytest.fail.Exception):
        check(shlex.split("python -m infra.gcp firewall --source-range 1.2.3.0/24 --cidr x"),
              capsys)
    with pytest.raises(AssertionError):
        check(shlex.split("python -m serve_app status --endpoint http://x"), capsys)
    with pytest.raises(AssertionError):
        check(shlex.split("ray up no_such_cluster.yaml"), capsys)
