"""Dockerfiles and compose.yaml read the way Docker reads them, for the tests: instructions with
their continuation lines joined, ENV pairs, exec-form commands."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = ROOT / "deploy" / "docker"
DOCKERFILES = {"cpu": DOCKER_DIR / "Dockerfile.cpu", "gpu": DOCKER_DIR / "Dockerfile.gpu"}
COMPOSE = ROOT / "compose.yaml"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def instructions(path: Path) -> list[Instruction]:
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # Docker drops comment lines inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    return out


def env(path: Path) -> dict[str, str]:
    """Every ENV of the final stage (a Dockerfile here has one)."""
    values: dict[str, str] = {}
    for ins in instructions(path):
        if ins.keyword == "ENV":
            for pair in shlex.split(ins.args):
                key, _, value = pair.partition("=")
                values[key] = value
    return values


def exec_form(args: str) -> list[str]:
    """The JSON array of CMD/ENTRYPOINT/HEALTHCHECK CMD; shell form is refused."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def last(path: Path, keyword: str) -> Instruction:
    found = [i for i in instructions(path) if i.keyword == keyword]
    assert found, f"{path.name} has no {keyword}"
    return found[-1]


def healthcheck_command(path: Path) -> list[str]:
    args = last(path, "HEALTHCHECK").args
    return exec_form(args[args.index("CMD") + 3:].strip())


def run_scripts(path: Path) -> list[str]:
    return [i.args for i in instructions(path) if i.keyword == "RUN"]


def copy_sources(path: Path) -> list[str]:
    sources = []
    for ins in instructions(path):
        if ins.keyword == "COPY" and "--from" not in ins.args:
            sources += shlex.split(ins.args)[:-1]
    return sources


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def shell_words(script: str) -> list[list[str]]:
    """A RUN script's simple commands (split on && and ;), as argv lists."""
    return [shlex.split(part) for part in re.split(r"&&|;", script) if part.strip()]
