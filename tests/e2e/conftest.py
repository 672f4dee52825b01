"""The whole stack in-process: a local Ray, real vLLM on CPU with SmolLM2, a real license server.
Started once per module (two modules would fight over one Ray).

``stack`` is the default layout as `python -m serve_app` runs it: the replica serves HTTP on
its own port, no Serve proxy. SmolLM2 comes as the vendor's licensed weights: published into a
bucket on moto's S3 server (loopback), presigned by the license server for the stack's
license (which names that model only), downloaded by the replica. ``router_stack`` is the router layout
(colocate_ingress=false): Serve's proxy in front of a CPU-only router replica, the engine
behind a handle."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serve_app.config import (
    DEFAULT_CACHE_DIR,
    RAY_SERVE_ENV,
    TELEMETRY_OFF_ENV,
    AppConfig,
    ModelConfig,
    Settings,
)
from serve_app.ray_internals import check_loopback
from tests.conftest import LicenseServerProcess, free_port, wait_for
from tests.processes import SESSION_ENV, session_processes

MODEL = "smollm2-135m-instruct"
ALIAS = "smollm2"

# Small limits so the overload test can reach them with a handful of requests.
# Eager: the fixture starts in ~20 s instead of ~60 s; test_cli runs the compiled default.
# A tool-call parser and an alias, as `vllm serve --tool-call-parser ... --served-model-name`.
# The vendor's licensed weights, downloaded through the license server in every run.
E2E_MODEL = ModelConfig(source=f"licensed:{MODEL}", max_ongoing_requests=4,
                        max_queued_requests=4, enforce_eager=True,
                        enable_auto_tool_choice=True, tool_call_parser="hermes",
                        served_model_name=(ALIAS,))


def e2e_config(key: str, data: Path, port: int) -> AppConfig:
    """``stack``'s config, E2E_MODEL read as `python -m serve_app` reads SERVE_APP_* settings:
    the model's name comes from its licensed: source, as customers get it. A fresh cache: the
    replica downloads the licensed model in every run."""
    return Settings(model=f"licensed:{MODEL}", license_key=key,
                    ledger_path=str(data / "ledger.db"), report_interval_s="2.0",
                    model_cache_dir=str(data / "models"), port=str(port),
                    max_ongoing_requests="4", max_queued_requests="4", enforce_eager="true",
                    enable_auto_tool_choice="true", tool_call_parser="hermes",
                    served_model_name=ALIAS).to_app_config()


class Session:
    """What this test session starts carries ``marker`` in its environment and keeps Ray's
    files (and so its processes' command lines) under ``ray_temp_dir``."""

    def __init__(self) -> None:
        self.marker = uuid.uuid4().hex
        # Short: Ray's Unix sockets live under it (paths are limited to 107 bytes).
        self.ray_temp_dir = tempfile.mkdtemp(prefix="sa-ray-")

    def processes(self):
        return session_processes(self.marker, self.ray_temp_dir)


@pytest.fixture(scope="session", autouse=True)
def session():
    """Every process the session started must be gone when it ends. Leftovers fail the
    session (an error in its last test's teardown), and are then killed: they are provably
    ours."""
    ours = Session()
    saved = {k: os.environ.get(k) for k in (SESSION_ENV, "RAY_TMPDIR")}
    os.environ[SESSION_ENV] = ours.marker
    os.environ["RAY_TMPDIR"] = ours.ray_temp_dir
    try:
        yield ours
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        # A stopped stack's processes take a few seconds to finish exiting.
        wait_for(lambda: not ours.processes(), timeout=60, interval=1,
                 what="the session's processes to exit")
    except AssertionError:
        left = ours.processes()
        for found in left:
            try:
                os.kill(found.pid, signal.SIGKILL)
            except OSError:
                pass
        if left:
            pytest.fail("processes outlived the test session:\n" + "\n".join(map(str, left)))
    finally:
        shutil.rmtree(ours.ray_temp_dir, ignore_errors=True)


@contextlib.contextmanager
def licensed_smollm2(data_dir: Path) -> Iterator[LicenseServerProcess]:
    """The license server with its vendor bucket on moto's S3 server (loopback), SmolLM2
    published in it under MODEL."""
    from moto.server import ThreadedMotoServer

    from license_server.catalog import ModelBucket
    from serve_app.weights.embedded import ensure_smollm2

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        bucket = ModelBucket(url="s3://vendor-models/models", region="us-east-1",
                             endpoint_url=f"http://{host}:{port}", access_key_id="testing",
                             secret_access_key="testing")
        license_server = LicenseServerProcess(data_dir, bucket=bucket).start()
        try:
            catalog = license_server.service.catalog
            catalog.client.create_bucket(Bucket=catalog.bucket)
            catalog.publish(MODEL, ensure_smollm2(Path(DEFAULT_CACHE_DIR)))
            yield license_server
        finally:
            license_server.stop()
    finally:
        moto.stop()


class Stack:
    def __init__(self, url: str, config: AppConfig, license_server: LicenseServerProcess,
                 data: Path | None = None) -> None:
        self.url = url
        self.config = config
        self.license_server = license_server
        self.data = data

    def flush_usage(self) -> dict:
        """Make the license actor seal and deliver everything now."""
        import ray

        lic = self.config.license
        actor = ray.get_actor(lic.actor_name, namespace=lic.namespace)
        return ray.get(actor.flush.remote(), timeout=60)

    def redeploy(self, config: AppConfig) -> None:
        """Replace the app's config in place; Serve keeps replicas whose config is unchanged.

        Returns once the new replica alone serves the port: Serve reports the app running
        when the new replica is up, and the old one may still be draining its listener."""
        from ray import serve

        from serve_app.builder import build_app_from_config

        serve.run(build_app_from_config(config), name="serve_app", route_prefix="/",
                  blocking=False)
        self.config = config
        wait_for(lambda: len(self.listeners()) == 1, timeout=120,
                 what="the replaced replica to stop listening")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def listeners(self) -> list[int]:
        """Processes listening on the app's port (a replica's own listener)."""
        import psutil

        return sorted({c.pid for c in psutil.net_connections(kind="tcp")
                       if c.status == psutil.CONN_LISTEN and c.laddr.port == self.port})

    def unfinished(self) -> int:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        match = re.search(r"^serve_app_engine_unfinished_requests\{[^}]*\} (\d+)", text, re.M)
        assert match, text[-2000:]
        return int(match.group(1))


@contextlib.contextmanager
def haproxy_ports_of_our_own() -> Iterator[None]:
    """Serve's HAProxy and fallback proxy listen on fixed side ports (stats, metrics) that
    other Ray instances on this machine may hold: free ones for the Ray this test starts (its
    processes inherit the environment; Serve in this process read its constants already)."""
    mp = pytest.MonkeyPatch()
    try:
        for var in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"):
            mp.setenv(var, str(free_port()))
        yield
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def router_stack(tmp_path_factory):
    """colocate_ingress=false as `python -m serve_app` starts it: Serve's proxy (HAProxy, as
    RAY_SERVE_ENV ships) on a free port, the router replica, SmolLM2 (the embedded copy: the
    licensed download is the other stack's) behind a handle, licensed by a real server."""
    import ray
    from ray import serve

    from serve_app.builder import build_app_from_config

    data = tmp_path_factory.mktemp("router")
    vendor = contextlib.ExitStack()
    license_server = LicenseServerProcess(data / "license_server").start()
    vendor.callback(license_server.stop)
    _, key = license_server.issue(heartbeat_interval_s=2.0)
    license = license_server.license_config(key, data / "ledger.db", report_interval_s=2.0)
    port = free_port()
    for name, value in RAY_SERVE_ENV.items():
        os.environ.setdefault(name, value)
    vendor.enter_context(haproxy_ports_of_our_own())
    ray.init(include_dashboard=False, runtime_env={"env_vars": dict(TELEMETRY_OFF_ENV)})
    try:
        check_loopback()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        model = E2E_MODEL.model_copy(update={"source": f"builtin:{MODEL}"})
        config = AppConfig(models=(model,), license=license, colocate_ingress=False)
        serve.run(build_app_from_config(config), name="serve_app", route_prefix="/",
                  blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200,
                 timeout=600, what="the router layout to become healthy")
        yield Stack(url, config, license_server)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            vendor.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    import ray
    from ray import serve

    from serve_app.builder import build_app_from_config

    data = tmp_path_factory.mktemp("e2e")
    vendor = contextlib.ExitStack()
    license_server = vendor.enter_context(licensed_smollm2(data / "license_server"))
    # A license for the one model the stack serves, as the vendor sells it.
    _, license_key = license_server.issue(heartbeat_interval_s=2.0, models=(MODEL,))
    port = free_port()
    for key, value in RAY_SERVE_ENV.items():  # test what `make serve` ships
        os.environ.setdefault(key, value)
    ray.init(include_dashboard=False, runtime_env={"env_vars": dict(TELEMETRY_OFF_ENV)})
    try:
        check_loopback()
        # As `python -m serve_app` runs it: the replica listens on the port, no Serve proxy.
        serve.start(proxy_location="Disabled")
        config = e2e_config(license_key, data, port)
        assert config.models[0] == E2E_MODEL  # the router layout's model, read from settings
        serve.run(build_app_from_config(config), name="serve_app", route_prefix="/",
                  blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200,
                 timeout=600, what="the app to become healthy")
        # The weights came from the vendor's bucket, through the license server's grant.
        assert (data / "models" / "licensed" / MODEL / ".complete").is_file()
        yield Stack(url, config, license_server, data)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            vendor.close()
