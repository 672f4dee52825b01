"""``python -m serve_app``: the whole stack in the foreground, stopped cleanly by Ctrl-C.

Starts a local Ray instance and the app, served on ``SERVE_APP_HOST:SERVE_APP_PORT``
(127.0.0.1:9000 by default, MariTalk Local's port) by the engine replicas themselves (or by
Serve's HTTP proxy in the router layout); prints how to call it. Beside it: ``status``,
``usage-log`` (the license), ``keys`` and ``usage`` (API keys, ``serve_app.tenants``),
``manifest``, ``chat``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from license_contract import build_manifest
from serve_app import licensing, tenants
from serve_app.affinity import pin_to_frontend
from serve_app.config import RAY_SERVE_ENV, TELEMETRY_OFF_ENV, AppConfig, Settings
from serve_app.process_guard import descendants, die_with_parent, guard_descendants
from serve_app.ray_internals import (
    LOOPBACK,
    check_loopback,
    is_node_start_timeout,
    own_port_switches,
    single_box_ray_env,
)
from serve_app.weights import resolve_model

logger = logging.getLogger("serve_app")
# The actor's own stop gives up after licensing.actor.STOP_TIMEOUT_S; this is that and a margin.
STOP_WAIT_S = 4.0


class Stop(BaseException):
    """SIGINT or SIGTERM: unwind, and stop everything on the way out."""


def start_ray(ray: Any, **init_kwargs: Any) -> None:
    """``ray.init``, and once more if Ray's node timed out on start (``ray_internals``), after
    killing what the failed attempt started: its GCS and raylet would hold their ports and
    memory. Processes started before (the local license server) are kept."""
    before = set(descendants(os.getpid()))
    try:
        ray.init(**init_kwargs)
    except Exception as exc:
        if not is_node_start_timeout(exc):
            raise
        logger.warning("Ray's node did not register in time (%s); starting Ray once more", exc)
        started = [pid for pid in descendants(os.getpid()) if pid not in before]
        for pid in started:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for pid in started:  # reap our own children; the others are not ours to wait for
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)
        ray.shutdown()
        ray.init(**init_kwargs)


def _trap_stop_signals() -> None:
    """The first SIGINT or SIGTERM stops the stack cleanly, whatever the CLI is doing (starting,
    waiting for health, serving); a second one ends the CLI at once. Ray's GCS and raylet and
    the local license server die with the CLI (kernel parent-death signals), Ray's workers with
    their raylet, and vLLM's engines with their replicas (``process_guard``)."""
    def first(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, again)
        signal.signal(signal.SIGTERM, again)
        raise Stop(signal.Signals(signum).name)

    def again(signum: int, frame: object) -> None:
        print(f"\n{signal.Signals(signum).name} again: exiting now.", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGINT, first)
    signal.signal(signal.SIGTERM, first)


def _wait_healthy(url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1.0)
    return False


def _usage(host: str, port: int, model: str, keyed: bool) -> str:
    url = f"http://{host}:{port}"
    auth = ' -H "Authorization: Bearer $KEY"' if keyed else ""
    return f"""
Serving {model!r} at {url}
  OpenAI:   curl {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' \\
              -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hi!"}}]}}'
            openai.OpenAI(base_url="{url}/v1", api_key="...")
  MariTalk: maritalk.MariTalkLocal(host="{host}", port={port}).generate("Hi!")
  Status:   {url}/   Health: {url}/health   Metrics: {url}/metrics   License: {url}/license
Press Ctrl-C to stop.
"""


class DevLicenseServer:
    """``make serve``'s local license server: SQLite under ``data_dir``, a development license
    issued on start. Customers get theirs from the vendor instead."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir / "license_server"
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        """Start the server and return the development license's key."""
        # The vendor's server runs as its own program (it ships in the `license-server` extra);
        # the app only speaks to it over HTTP, as to the vendor's.
        # Its key is not one this build pins, so it takes heartbeats from development licenses.
        env = {**os.environ, "LICENSE_SERVER_DATA_DIR": str(self.data_dir),
               "LICENSE_SERVER_PORT": str(self.port),
               "LICENSE_SERVER_POLICY__ACCEPT_DEVELOPMENT": "true"}
        issued = subprocess.run(
            [sys.executable, "-m", "license_server", "issue", "--customer",
             "local-development", "--days", "30", "--models", "*", "--json"],
            env=env, check=True, capture_output=True, text=True)
        dev = json.loads(issued.stdout)
        # Loopback: only this box's app uses it. SIGINT blocked: a Ctrl-C reaches the whole
        # foreground process group, and the app reports its last usage while it stops; the
        # CLI stops this server after the app. It dies with the CLI whatever happens to that.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "license_server", "serve", "--host", LOOPBACK,
             "--port", str(self.port)],
            env=env, preexec_fn=_license_server_preexec)
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the local license server did not start") from None
                time.sleep(0.3)
        print(f"License server at {url}; development license {dev['license']['license_id']} "
              f"(data in {self.data_dir})", flush=True)
        return dev["key"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _license_server_preexec() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    die_with_parent()


def run(settings: Settings, dev_license: bool = False) -> int:
    _trap_stop_signals()
    try:
        return _run_with_license(settings, dev_license)
    except Stop as stop:
        print(f"\n{stop}: stopped.", flush=True)
        return 0


def _run_with_license(settings: Settings, dev_license: bool) -> int:
    license_server = None
    try:
        if dev_license and settings.license_key is None:
            data_dir = Path(settings.data_dir).resolve()
            license_server = DevLicenseServer(data_dir, settings.license_server_port)
            key = license_server.start()
            settings = settings.model_copy(update={
                "license_key": SecretStr(key),
                "ledger_path": str(data_dir / "usage_ledger.db"), "report_interval_s": 30.0})
        return _run(settings)
    finally:
        if license_server is not None:
            license_server.stop()


def _run(settings: Settings) -> int:
    # Set before Ray starts so every process it spawns (and vLLM's) inherits them.
    os.environ.update(TELEMETRY_OFF_ENV)
    os.environ.update(single_box_ray_env())
    for key, value in RAY_SERVE_ENV.items():
        os.environ.setdefault(key, value)  # an explicit choice of the user's wins
    config = settings.to_app_config()
    if config.http_port is not None:
        os.environ.update(own_port_switches(dict(os.environ)))
    keyed = _check_exposure(settings.host, config)
    for model in config.models:
        print(f"Preparing model {model.name} from {model.source} ...", flush=True)
        resolve_model(model.source, config.model_cache_dir, s3=model.s3_options(),
                      license=config.license)

    import ray
    from ray import serve

    from serve_app.builder import build_app_from_config

    if any(m.local_device() == "cpu" for m in config.models):
        pin_to_frontend()  # every Ray process inherits this; see affinity.py
    start_ray(ray, include_dashboard=False, runtime_env={"env_vars": dict(TELEMETRY_OFF_ENV)})
    # Ray's core worker replaces the SIGTERM handler with one that dumps a stack and aborts.
    _trap_stop_signals()
    try:
        guard_descendants()  # Ray's processes end with the CLI, however it ends
        check_loopback()
        if config.http_port is not None:
            # The replicas listen on the port themselves (listener.py): no proxy to start.
            serve.start(proxy_location="Disabled")
        else:
            serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_app_from_config(config), name="serve_app", route_prefix="/", blocking=False)
        # Probe over loopback even when serving on every interface.
        probe_host = LOOPBACK if settings.host in ("0.0.0.0", "::", "") else settings.host
        url = f"http://{probe_host}:{settings.port}"
        print("Starting vLLM replicas ...", flush=True)
        if not _wait_healthy(url, timeout_s=600):
            print("The app did not become healthy within 10 minutes.", file=sys.stderr)
            return 1
        print(_usage(settings.host, settings.port, config.models[0].name, keyed),
              flush=True)
        while True:
            signal.pause()
    except Stop:
        print("\nStopping ...", flush=True)
        raise
    finally:
        try:
            serve.shutdown()  # the replicas say goodbye to the license actor on their way out
            if config.license is not None:
                _deliver_usage(config.license)
        finally:
            ray.shutdown()


def _deliver_usage(license: licensing.LicenseConfig) -> None:
    """Once the replicas are gone: the license actor delivers what is pending and tells the
    license server this cluster stops, within its stop timeout; what does not go out is kept in
    the ledger for the next start."""
    import ray

    try:
        actor = ray.get_actor(license.actor_name, namespace=license.namespace)
        totals = ray.get(actor.stop.remote(), timeout=STOP_WAIT_S)
    except Exception as exc:  # the actor is gone or stuck: the ledger has it all
        logger.warning("Usage not delivered on stop (%r): it goes out at the next start", exc)
        return
    left = totals["pending_seconds"] + totals["other_pending_seconds"]
    print(f"Usage: {left:.1f} instance-seconds not delivered yet; they go out at the next start."
          if left else "Usage delivered to the license server.", flush=True)


def _check_exposure(host: str, config: AppConfig) -> bool:
    """The replicas refuse to serve the network without a key; said here first, before Ray and
    the model start, with the store's keys read from its file. Returns whether clients will
    need a key."""
    active = len(config.api_keys)
    if config.key_store_path and Path(config.key_store_path).expanduser().exists():
        store = tenants.KeyStore(config.key_store_path).start()
        try:
            active += store.active_keys()
        finally:
            store.close()
    try:
        warning = tenants.check_exposure([host], active, config.allow_unauthenticated)
    except tenants.UnauthenticatedExposureError as exc:
        raise SystemExit(f"error: {exc}") from None
    if warning:
        logger.warning(warning)
    return not config.allow_unauthenticated and (active > 0 or not tenants.is_loopback(host))


def usage_log_command(argv: list[str]) -> int:
    """``python -m serve_app usage-log ...`` on the ledger the settings name."""
    settings = Settings()
    key = settings.license_key.get_secret_value() if settings.license_key else None
    return licensing.usage_log_command(
        argv, ledger=settings.ledger_path,
        dev_ledger=str(Path(settings.data_dir) / "usage_ledger.db"), key=key)


def license_command(argv: list[str]) -> int:
    """``python -m serve_app license request|import``: an air-gapped installation's activation
    and leases by file, for the model and replicas the settings name."""
    settings = Settings()
    model = settings.to_app_config().models[0]
    key = settings.license_key.get_secret_value() if settings.license_key else None
    return licensing.license_command(
        argv, key=key, ledger=settings.ledger_path, models=(model.name,),
        instances=model.max_replicas,
        gpus=float(model.max_replicas * model.tensor_parallel_size
                   if model.scheduling_device() == "gpu" else 0))


def print_manifest(argv: list[str]) -> int:
    """``python -m serve_app manifest FOLDER``: the manifest of a model folder, to publish next
    to its files in a bucket (an ``s3://`` source)."""
    if len(argv) != 1:
        print("usage: python -m serve_app manifest MODEL_FOLDER > manifest.json", file=sys.stderr)
        return 2
    sys.stdout.write(build_manifest(argv[0]).to_json())
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        licensing.status(argv[1:])
        return
    if argv[:1] == ["usage-log"]:
        sys.exit(usage_log_command(argv[1:]))
    if argv[:1] == ["license"]:
        sys.exit(license_command(argv[1:]))
    if argv[:1] == ["manifest"]:
        sys.exit(print_manifest(argv[1:]))
    if argv[:1] == ["keys"]:
        sys.exit(tenants.keys_command(argv[1:], store=Settings().key_store_path))
    if argv[:1] == ["chat"]:
        from serve_app.chat import main as chat

        sys.exit(chat(argv[1:]))
    if argv[:1] == ["usage"]:
        sys.exit(tenants.usage_command(argv[1:], store=Settings().key_store_path))
    parser = argparse.ArgumentParser(prog="python -m serve_app", description=__doc__)
    parser.add_argument("--port", type=int, help="HTTP port (default 9000).")
    parser.add_argument("--host", help="HTTP host (default 127.0.0.1).")
    parser.add_argument("--model", help="Model source (default the builtin SmolLM2).")
    parser.add_argument("--enforce-eager", action="store_true", default=None,
                        help="run vLLM eager: starts ~3x faster, decodes ~4-10%% slower on CPU")
    parser.add_argument("--stream-interval-ms", type=float,
                        help="hand a stream's new tokens on at most this often (default 20; 0: "
                        "every token, like `vllm serve`)")
    parser.add_argument("--dev-license", action="store_true",
                        help="start a local license server and run with a development license")
    ns = parser.parse_args(argv)
    dev_license = ns.dev_license
    overrides = {k: v for k, v in vars(ns).items() if v is not None and k != "dev_license"}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    code = run(Settings(**overrides), dev_license=dev_license)
    # Serve, Ray and the local license server have stopped by now; all that is left is the
    # interpreter's finalisation of Ray's and the app's modules, which took seconds on a busy
    # 2-core box and pushed `docker stop` past its 10 s. Flush what was printed, and leave.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
