"""The whole stack in-process: a local Ray, Serve's proxy on a free port, real vLLM on CPU with
SmolLM2. Started once per module (two modules would fight over one Ray).

SmolLM2 comes as the vendor's licensed weights: published into a bucket on moto's S3 server
(loopback), presigned by the license server for the stack's license, downloaded by the replica."""

from __future__ import annotations

import contextlib
import os
import re
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
)
from tests.conftest import LicenseServerProcess, free_port, wait_for

MODEL = "smollm2-135m-instruct"

# Small limits so the overload test can reach them with a handful of requests.
# Eager: the fixture starts in ~20 s instead of ~60 s; test_cli runs the compiled default.
E2E_MODEL = ModelConfig(source=f"licensed:{MODEL}", max_ongoing_requests=4,
                        max_queued_requests=4, enforce_eager=True)


@contextlib.contextmanager
def licensed_smollm2(data_dir: Path) -> Iterator[LicenseServerProcess]:
    """The license server with its vendor bucket on moto's S3 server (loopback), SmolLM2
    published in it under MODEL."""
    from moto.server import ThreadedMotoServer

    from infra.license_server.catalog import ModelBucket
    from serve_app.models import ensure_smollm2

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
    def __init__(self, url: str, config: AppConfig, license_server: LicenseServerProcess) -> None:
        self.url = url
        self.config = config
        self.license_server = license_server

    def flush_usage(self) -> dict:
        """Make the license actor seal and deliver everything now."""
        import ray

        lic = self.config.license
        actor = ray.get_actor(lic.actor_name, namespace=lic.namespace)
        return ray.get(actor.flush.remote(), timeout=60)

    def redeploy(self, config: AppConfig) -> None:
        """Replace the app's config in place; Serve keeps replicas whose config is unchanged."""
        from ray import serve

        from serve_app.builder import build_app_from_config

        serve.run(build_app_from_config(config), name="serve_app", route_prefix="/",
                  blocking=False)
        self.config = config

    def unfinished(self) -> int:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        match = re.search(r"^serve_app_engine_unfinished_requests\{[^}]*\} (\d+)", text, re.M)
        assert match, text[-2000:]
        return int(match.group(1))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    import ray
    from ray import serve

    from serve_app.builder import build_app_from_config

    data = tmp_path_factory.mktemp("e2e")
    vendor = contextlib.ExitStack()
    license_server = vendor.enter_context(licensed_smollm2(data / "license_server"))
    _, key = license_server.issue(heartbeat_interval_s=2.0)
    license = license_server.license_config(key, data / "ledger.db", report_interval_s=2.0)
    port = free_port()
    for key, value in RAY_SERVE_ENV.items():  # test what `make serve` ships
        os.environ.setdefault(key, value)
    ray.init(include_dashboard=False, runtime_env={"env_vars": dict(TELEMETRY_OFF_ENV)})
    try:
        # As `python -m serve_app` runs it: the replica listens on the port, no Serve proxy.
        serve.start(proxy_location="Disabled")
        # A fresh cache: the replica downloads the licensed model in every run.
        config = AppConfig(models=(E2E_MODEL,), license=license, http_port=port,
                           model_cache_dir=str(data / "models"))
        serve.run(build_app_from_config(config), name="serve_app", route_prefix="/",
                  blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200,
                 timeout=600, what="the app to become healthy")
        # The weights came from the vendor's bucket, through the license server's grant.
        assert (data / "models" / "licensed" / MODEL / ".complete").is_file()
        yield Stack(url, config, license_server)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            vendor.close()
