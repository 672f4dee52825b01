"""The architecture's boundaries, as import-linter checks them (pyproject.toml's
``[tool.importlinter]``, also run by ``make lint``): they hold on this tree, and each breaks
when a module crosses it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("serve_app", "license_contract", "license_server", "infra", "tests")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    # lint-imports puts its working directory first on sys.path: it analyses `root`'s copies.
    return subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
                          cwd=root, capture_output=True, text=True, timeout=120)


def contract_lines(output: str) -> dict[str, str]:
    """Contract name -> KEPT or BROKEN, from lint-imports' summary."""
    out = {}
    for line in output.splitlines():
        # A contract with ignore_imports says how many after its verdict.
        line = re.sub(r" \(\d+ ignored imports?\)$", "", line.rstrip())
        for verdict in ("KEPT", "BROKEN"):
            if line.endswith(verdict):
                out[line[: -len(verdict)].strip()] = verdict
    return out


def test_the_tree_keeps_every_contract():
    run = lint_imports(ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    verdicts = contract_lines(run.stdout)
    assert len(verdicts) >= 9 and set(verdicts.values()) == {"KEPT"}, verdicts


def test_each_crossing_breaks_its_contract(tmp_path):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    crossings = {
        "license_server/crossing.py": "from serve_app import config\n",
        "serve_app/licensing/crossing.py": "from ray.serve import deployment\n",
        "serve_app/weights/crossing.py": "import vllm\n",
        "serve_app/tenants/crossing.py": "from serve_app import errors\n",
        "serve_app/crossing.py": "from ray.serve._private import constants\n"
                                 "from serve_app.licensing.ledger import UsageLedger\n",
        "license_contract/crossing.py": "import httpx\n",
        # errors -> crossing -> errors: a cycle between two sibling modules.
        "serve_app/cycle.py": "from serve_app import errors\n",
    }
    for path, text in crossings.items():
        (tmp_path / path).write_text(text)
    errors = tmp_path / "serve_app" / "errors.py"
    errors.write_text(errors.read_text() + "\nfrom serve_app import cycle  # noqa\n")
    run = lint_imports(tmp_path)
    assert run.returncode != 0
    broken = {name for name, verdict in contract_lines(run.stdout).items() if verdict == "BROKEN"}
    assert broken == {
        "The vendor's license server imports only the contract of the customer's side",
        "Licensing, tenants and the contract import neither vLLM nor Ray Serve",
        "Tenants import no serving module, licensing's placement aside",
        "vLLM is imported only by its fence, serve_app.vllm_internals",
        "Ray's private modules are touched only by their fence, serve_app.ray_internals",
        "Packages are used through their public names",
        "The contract is pure: no Ray, no vLLM, no web or database stack, neither product",
        "No import cycles between sibling modules",
    }, run.stdout[-4000:]
