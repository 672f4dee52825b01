"""Cluster YAMLs for `ray up`: render them as Ray will, and check what keeps a cluster closed.

``render`` runs Ray's own preparation and schema validation offline (no cloud call): what
``ray up`` does before it contacts a provider. ``security_problems`` and ``license_problems``
are pure checks shared by the preflight CLIs and the tests:

- token auth is on for every ``ray start`` and the token file reaches every node;
- the dashboard listens on the head's loopback only (reached through ``ray dashboard``, an SSH
  tunnel);
- the license the nodes load names an HTTPS license server.
"""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path
from typing import Any

import yaml

from license_contract import LicenseError
from serve_app import ray_internals
from serve_app.licensing import read_license

TOKEN_FILE = "~/.ray/auth_token"
LICENSE_ENV_FILE = "~/.serve_app/license.env"
# The custom resource the head node declares; the license actor is placed by it, next to its
# usage ledger, on the node that outlives the workers.
HEAD_RESOURCE = "serve_app_head"
_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)


def load(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a cluster YAML is a mapping, got {type(config).__name__}")
    return config


def render(config: dict[str, Any]) -> dict[str, Any]:
    """The config as ``ray up`` sees it before bootstrapping: Ray's defaults merged in, setup
    commands merged, per-type worker limits filled, then Ray's JSON schema applied (through
    Ray's own code, see ``ray_internals.prepare_cluster_config``). Raises
    ``jsonschema.ValidationError`` on a typo or a wrong type."""
    return ray_internals.prepare_cluster_config(config)


def head_bootstrap_config(rendered: dict[str, Any]) -> dict[str, Any]:
    """The config ``ray up`` writes to the head (``~/ray_bootstrap_config.yaml``) for the
    autoscaler there, which starts the workers with its ``worker_start_ray_commands`` and copies
    them its ``file_mounts``: the head's own copies of the laptop's files."""
    return ray_internals.head_bootstrap_config(rendered)


def command_env(command: str) -> dict[str, str]:
    """Variables a shell command sets before it runs ``ray start``: ``export A=1 B=2 && ...`` or
    ``A=1 ray start ...``. Assignments after ``ray start`` are arguments, not environment."""
    env: dict[str, str] = {}
    words = shlex.split(command.replace("&&", " && ").replace(";", " ; "))
    for i, word in enumerate(words):
        if word == "ray" and words[i + 1 : i + 2] == ["start"]:
            break
        match = _ASSIGNMENT.match(word)
        if match:
            env[match.group(1)] = match.group(2)
    return env


def ray_start_commands(config: dict[str, Any], role: str) -> list[str]:
    """The ``ray start`` commands of ``role`` ("head" or "worker")."""
    return [c for c in config.get(f"{role}_start_ray_commands", []) if "ray start" in c]


def security_problems(config: dict[str, Any]) -> list[str]:
    """What leaves a rendered cluster open to whoever reaches Ray's ports, or the license actor
    without its node; empty when none."""
    problems = []
    for role in ("head", "worker"):
        starts = ray_start_commands(config, role)
        if not starts:
            problems.append(f"{role}_start_ray_commands has no `ray start`")
        for command in starts:
            if command_env(command).get("RAY_AUTH_MODE") != "token":
                problems.append(f"{role}: `ray start` without RAY_AUTH_MODE=token")
    mounts = {_home(remote): _home(local) for remote, local in config.get("file_mounts", {}).items()}
    if mounts.get(TOKEN_FILE) is None:
        problems.append(f"file_mounts does not copy Ray's token ({TOKEN_FILE}) to the nodes")
    if not head_resources(config).get(HEAD_RESOURCE):
        problems.append(f"head: no {HEAD_RESOURCE} resource, which places the license actor")
    for command in ray_start_commands(config, "head"):
        host = _option(command, "--dashboard-host")
        if host not in ("127.0.0.1", "localhost"):
            problems.append(f"head: dashboard on {host or 'Ray default'}, not loopback; reach it "
                            "through `ray dashboard` (an SSH tunnel)")
    return problems


def head_resources(config: dict[str, Any]) -> dict[str, float]:
    """Custom resources the head declares: its node type's (cloud providers pass them to ``ray
    start``), or ``--resources`` of its ``ray start`` (the local provider passes none)."""
    import json

    declared = dict(config["available_node_types"][config["head_node_type"]].get("resources", {}))
    for command in ray_start_commands(config, "head"):
        declared.update(json.loads(_option(command, "--resources") or "{}"))
    return declared


def license_problems(env_text: str, now: float | None = None) -> list[str]:
    """Check a ``license.env`` (``KEY=value`` lines): the key is signed by a vendor key this
    build pins, is unexpired, and names an HTTPS license server."""
    env = parse_env(env_text)
    if "SERVE_APP_LICENSE_KEY" not in env:
        return ["license env lacks SERVE_APP_LICENSE_KEY"]
    try:
        lic, development = read_license(env["SERVE_APP_LICENSE_KEY"],
                                        now=time.time() if now is None else now)
    except LicenseError as exc:
        return [str(exc)]
    if development:
        return [f"license {lic.license_id} is a development license: this build does not pin "
                "the key that signed it, and the vendor's license server refuses it"]
    if not lic.server_url.startswith("https://"):
        return [f"license server {lic.server_url} is not HTTPS: usage reports and the license "
                "key would cross the network in clear; ask the vendor for an HTTPS one"]
    return []


def local_problems(config: dict[str, Any]) -> list[str]:
    """The files ``ray up`` will copy to the nodes: Ray's token and the license env file."""
    mounts = {_home(remote): local for remote, local in config.get("file_mounts", {}).items()}
    problems = []
    token = Path(mounts.get(TOKEN_FILE, TOKEN_FILE)).expanduser()
    if not token.is_file() or not token.read_text().strip():
        problems.append(f"no Ray token at {token}: run `ray get-auth-token --generate`")
    env_file = Path(mounts.get(LICENSE_ENV_FILE, LICENSE_ENV_FILE)).expanduser()
    if not env_file.is_file():
        problems.append(f"no license env file at {env_file}: write a SERVE_APP_LICENSE_KEY=... "
                        "line into it (chmod 600)")
    else:
        problems += [f"{env_file}: {p}" for p in license_problems(env_file.read_text())]
    return problems


def main(argv: list[str] | None = None) -> int:
    """``python -m infra.cluster_yaml CLUSTER_YAML``: what ``ray up`` would refuse or regret."""
    ns = parser().parse_args(argv)
    problems = check(ns.config)
    for problem in problems:
        print(f"problem: {problem}")
    print(f"{len(problems)} problem(s)" if problems else f"{ns.config}: ready for `ray up`")
    return 1 if problems else 0


def parser():
    import argparse

    parser = argparse.ArgumentParser(prog="python -m infra.cluster_yaml", description=main.__doc__)
    parser.add_argument("config", help="the cluster YAML, e.g. infra/onprem/ray_cluster.yaml")
    return parser


def check(path: str | Path) -> list[str]:
    """Ray's validation, then security_problems and local_problems, of one cluster YAML."""
    import jsonschema

    try:
        rendered = render(load(path))
    except (jsonschema.ValidationError, ValueError, KeyError) as exc:
        return [f"{path}: Ray refuses it: {getattr(exc, 'message', exc)}"]
    return security_problems(rendered) + local_problems(rendered)


def parse_env(text: str) -> dict[str, str]:
    """``KEY=value`` lines as a shell's ``set -a; . file`` reads the simple ones."""
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line.removeprefix("export "))
        match = _ASSIGNMENT.match(words[0]) if len(words) == 1 else None
        if not match:
            raise ValueError(f"not a KEY=value line: {line[:40]!r}")
        env[match.group(1)] = match.group(2)
    return env


def _option(command: str, name: str) -> str | None:
    words = shlex.split(command.replace("&&", " && "))
    for i, word in enumerate(words):
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
        if word == name and i + 1 < len(words):
            return words[i + 1]
    return None


def _home(path: str) -> str:
    return "~" + path[len(str(Path.home())):] if path.startswith(str(Path.home())) else path


if __name__ == "__main__":
    raise SystemExit(main())
