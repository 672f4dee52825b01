"""Ray Serve in-process under an air-gapped license: the real license actor, ingress and
replicas (a stand-in engine), the vendor's desk in this process, files carried between them by
the commands' own functions, and a license server address nothing listens on."""

from __future__ import annotations

import json
import os

import httpx
import pytest

from serve_app.config import RAY_SERVE_ENV, TELEMETRY_OFF_ENV, AppConfig, ModelConfig
from serve_app.licensing import airgap
from serve_app.licensing.ledger import UsageLedger
from serve_app.licensing.vendor import read_license
from tests.conftest import free_port, wait_for
from tests.serve.test_licensed_serving import CHAT, LicensedFakeLLM

pytestmark = pytest.mark.serve


def test_an_air_gapped_cluster_serves_under_a_lease_carried_by_hand(tmp_path):
    import ray
    from pydantic import SecretStr
    from ray import serve

    from license_server.airgap import AirGapDesk
    from license_server.app import IssueRequest, LicenseService
    from license_server.db import LicenseStore
    from serve_app.builder import build_app_from_config
    from serve_app.licensing import LicenseConfig
    from tests.fakes import VENDOR_KEY

    for key, value in RAY_SERVE_ENV.items():
        os.environ.setdefault(key, value)
    store = LicenseStore(f"sqlite:///{tmp_path / 'vendor.db'}").start()
    # Nothing listens on the license server's address: a dial would fail, not reach anyone.
    service = LicenseService(store, VENDOR_KEY, f"http://127.0.0.1:{free_port()}")
    desk = AirGapDesk(service)
    _, key = service.issue(IssueRequest(customer="Bank", models=("*",), air_gapped=True,
                                        heartbeat_interval_s=1.0, grace_period_s=30 * 86400))
    lic = read_license(key)[0]
    ledger_path = str(tmp_path / "head" / "ledger.db")
    license = LicenseConfig(key=SecretStr(key), ledger_path=ledger_path, report_interval_s=1.0,
                            actor_name=f"license_airgap_{os.getpid()}")
    port = free_port()
    config = AppConfig(models=(ModelConfig(name="m", device="cpu"),), license=license,
                       http_port=port)
    url = f"http://127.0.0.1:{port}"

    def on_ledger(fn):
        ledger = UsageLedger(ledger_path).start()
        try:
            return fn(ledger)
        finally:
            ledger.close()

    ray.init(address="local", include_dashboard=False, num_cpus=4,
             runtime_env={"env_vars": dict(TELEMETRY_OFF_ENV)})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        serve.run(build_app_from_config(config, llm_cls=LicensedFakeLLM), name="airgapped",
                  route_prefix="/", blocking=False)

        def answer() -> httpx.Response | None:
            try:
                return httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=10)
            except httpx.HTTPError:
                return None

        wait_for(lambda: answer() is not None, timeout=120, what="the app")
        refused = answer()
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "license_airgap_no_lease"

        request = on_ledger(lambda led: airgap.activation_request(
            lic, key, led, ledger_path, models=("m",), instances=1, gpus=0.0,
            now=service.now()))
        lease = desk.activate(request)
        on_ledger(lambda led: airgap.import_lease(lic, led, ledger_path, lease,
                                                  now=service.now()))
        wait_for(lambda: answer().status_code == 200, timeout=60, what="serving under the lease")
        status = httpx.get(f"{url}/license", timeout=10).json()
        assert status["air_gapped"] and status["state"] == "ok"
        assert status["lease_expires_at"] == pytest.approx(service.now() + 30 * 86400, abs=120)
        wait_for(lambda: on_ledger(lambda led: led.totals()["instance_seconds"]) > 2,
                 timeout=60, what="usage logged")

        actor = ray.get_actor(license.actor_name, namespace=license.namespace)
        serve.shutdown()
        ray.get(actor.stop.remote(), timeout=30)
        bundle = on_ledger(lambda led: airgap.export_bundle(lic, led, ledger_path,
                                                            now=service.now()))
        renewal = json.loads(desk.import_usage(bundle))
        assert renewal["acknowledged_head"] == json.loads(bundle)["head"]
        # What the log holds after the head the activation acknowledged (ticks before the
        # request, while nothing was served, are not carried): the bundle's whole content.
        activated = json.loads(lease)["acknowledged_head"]
        carried = on_ledger(lambda led: led.log_after(activated))
        logged = sum(i["end"] - i["start"] for _, text, _ in carried
                     for i in json.loads(text).get("intervals", []))
        assert logged > 2
        assert store.total_instance_seconds(lic.license_id) == pytest.approx(logged, abs=1e-3), (
            renewal, json.loads(bundle)["entries"])
        # The app started before the request: its start entry precedes what is carried.
        assert set(json.loads(bundle)["entries"]) == {"beat", "report", "stop"}
    finally:
        serve.shutdown()
        ray.shutdown()
        store.engine.dispose()
