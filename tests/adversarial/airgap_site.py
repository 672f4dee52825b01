"""An air-gapped customer's cluster under a simulated clock, and the vendor's desk it carries files
to by hand.

``AirGapSite`` holds the vendor's license service (its air-gapped desk, no HTTP: nothing is
dialled), the license actor on a transport that fails the test if it is ever used, one ingress's
``LicenseGate`` and the replicas. The customer's and the vendor's commands are methods
(``request``, ``activate``, ``take``, ``export``, ``import_usage``); ``run`` advances true time
a heartbeat at a time and records when the gate served new requests.
"""

from __future__ import annotations

from pathlib import Path

import httpx
from pydantic import SecretStr

from license_server.airgap import AirGapDesk
from license_server.app import IssueRequest, LicenseService
from license_server.db import LicenseStore
from serve_app.licensing import LicenseConfig, LicenseGate
from serve_app.licensing import airgap as customer
from serve_app.licensing.actor import LicenseActor
from serve_app.licensing.vendor import read_license
from tests.fakes import VENDOR_KEY, Clocks

HEARTBEAT_S = 3600.0  # a beat an hour keeps 90 days to ~2,000 steps
LEASE_S = 30 * 86400.0
DAY = 86400.0


class NoNetwork(httpx.AsyncBaseTransport):
    """An air-gapped installation has no route to the vendor: any request fails the test."""

    def __init__(self) -> None:
        self.requests: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(str(request.url))
        raise AssertionError(f"an air-gapped installation dialled {request.url}")


class AirGapSite:
    def __init__(self, folder: Path, *, clock: Clocks | None = None, days: float = 365,
                 max_instances: int | None = None, max_gpus: float | None = None,
                 database_url: str | None = None, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.folder = folder
        self.heartbeat_s = heartbeat_s
        self.clock = clock or Clocks()
        store = LicenseStore(database_url or f"sqlite:///{folder / 'vendor.db'}",
                             now=self.clock).start()
        if store.engine is not None and store.engine.dialect.name == "postgresql":
            from tests.unit.test_license_server import reset_database

            reset_database(store.engine)  # a shared server: start from empty tables
        self.service = LicenseService(store, VENDOR_KEY, "http://license.test", now=self.clock)
        self.desk = AirGapDesk(self.service)
        self.license, self.key = self.service.issue(IssueRequest(
            customer="Bank", models=("*",), heartbeat_interval_s=heartbeat_s,
            grace_period_s=LEASE_S, air_gapped=True, days=days, max_instances=max_instances,
            max_gpus=max_gpus))
        self.ledger_path = str(folder / "head" / "ledger.db")
        self.config = LicenseConfig(key=SecretStr(self.key), ledger_path=self.ledger_path,
                                    report_interval_s=heartbeat_s)
        self.network = NoNetwork()
        self.replicas: dict[str, float] = {"r1": 0.0, "r2": 0.0}  # id -> GPUs
        self.actor: LicenseActor | None = None
        self.gate: LicenseGate | None = None
        self.served: list[tuple[float, str | None]] = []  # (true time, refusal code or None)
        self.boot = "boot-1"
        self.runs = 0

    # -- the stack -------------------------------------------------------------------------------

    async def start(self) -> AirGapSite:
        self.actor = LicenseActor(self.config, now=self.clock.wall, monotonic=self.clock.mono,
                                  transport=self.network, autostart=False,
                                  boot_id=lambda: self.boot)
        self.runs += 1
        if self.runs > 1:  # replicas of a new run are new replicas, with ids of their own
            self.replicas = {f"{r.split('@')[0]}@{self.runs}": g for r, g in self.replicas.items()}
        for replica, gpus in self.replicas.items():
            await self.actor.register(replica, "m", gpus)
        self.gate = LicenseGate(self.actor.state, now=self.clock.mono)
        await self.beat()
        return self

    async def stop(self) -> None:
        """A clean stop: the replicas go, the actor logs what is pending and a stop entry."""
        assert self.actor is not None
        await self.actor.stop()
        self.actor._ledger.close()
        self.actor = None

    def reboot(self, down_s: float) -> None:
        """The (stopped) head node is down for ``down_s`` and boots again: its monotonic clock
        starts over."""
        assert self.actor is None
        self.clock.advance(down_s)
        self.clock.reboot()
        self.boot = f"boot-{int(self.boot.split('-')[1]) + 1}"

    async def beat(self) -> None:
        assert self.actor is not None and self.gate is not None
        for replica, gpus in self.replicas.items():
            await self.actor.heartbeat(replica, "m", gpus)
        await self.actor._step()
        await self.gate.refresh()

    def refusal(self) -> str | None:
        assert self.gate is not None
        refused = self.gate.refusal()
        return None if refused is None else refused["code"]

    async def run(self, seconds: float) -> None:
        end = self.clock.t + seconds
        while self.clock.t < end - 1e-6:
            self.clock.advance(min(self.heartbeat_s, end - self.clock.t))
            await self.beat()
            self.served.append((self.clock.t, self.refusal()))

    # -- files carried by hand -------------------------------------------------------------------

    def _ledger(self):  # the running actor's ledger, or the file's when it is stopped
        from serve_app.licensing.ledger import UsageLedger

        if self.actor is not None:
            return self.actor._ledger, False
        return UsageLedger(self.ledger_path).start(), True

    def _customer(self, fn, *args, **kwargs):
        ledger, opened = self._ledger()
        try:
            lic = read_license(self.key, check_expiry=False)[0]
            return fn(lic, *args, ledger=ledger, now=self.clock.wall(), **kwargs)
        finally:
            if opened:
                ledger.close()

    def request(self, instances: int = 2, gpus: float = 0.0) -> str:
        """``python -m serve_app license request`` on the head node."""
        return self._customer(lambda lic, ledger, now: customer.activation_request(
            lic, self.key, ledger, self.ledger_path, models=("m",), instances=instances,
            gpus=gpus, now=now))

    def take(self, lease_file: str):
        """``python -m serve_app license import``."""
        return self._customer(lambda lic, text, ledger, now: customer.import_lease(
            lic, ledger, self.ledger_path, text, now=now), lease_file)

    def export(self) -> str:
        """``python -m serve_app usage-log export``."""
        return self._customer(lambda lic, ledger, now: customer.export_bundle(
            lic, ledger, self.ledger_path, now=now))

    def activate(self, request_file: str) -> str:
        """``python -m license_server activate``."""
        return self.desk.activate(request_file)

    def import_usage(self, bundle_file: str) -> str:
        """``python -m license_server import-usage``."""
        return self.desk.import_usage(bundle_file)

    async def renew(self) -> str:
        """Export, carry, import at the vendor's, carry back, import at the customer's."""
        renewal = self.import_usage(self.export())
        self.take(renewal)
        if self.actor is not None:
            await self.beat()  # the actor takes it at its next tick
        return renewal

    # -- the two sides' books ---------------------------------------------------------------------

    def customer_log_seconds(self) -> float:
        ledger, opened = self._ledger()
        try:
            check = ledger.verify_log()
            assert check.ok, check.problems
            return sum(d["instance_seconds"] for d in check.days)
        finally:
            if opened:
                ledger.close()

    def vendor_seconds(self) -> float:
        return self.service.store.total_instance_seconds(self.license.license_id)

    def vendor_days(self) -> dict[str, float]:
        page = self.service.usage(self.license.license_id, limit=1000)
        return {r["day"]: r["instance_seconds"] for r in page["usage"] if r["instance_seconds"]}

    def customer_days(self) -> dict[str, float]:
        ledger, opened = self._ledger()
        try:
            return {d["day"]: d["instance_seconds"] for d in ledger.verify_log().days}
        finally:
            if opened:
                ledger.close()

    def flags(self) -> list[dict]:
        page = self.service.usage(self.license.license_id, limit=1000)
        return [f for row in page["usage"] for f in row["flags"]] + page["alerts"]
