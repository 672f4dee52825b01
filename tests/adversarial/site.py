"""A customer's cluster under a simulated clock, against the vendor's license server.

``Site`` holds the vendor's server (the real app, in process, behind ``LicenseWire``), the
license actor, one ingress's ``LicenseGate`` and the replicas that heartbeat every interval. The
customer's moves are methods: cut the network, kill the actor, delete the ledger, set the wall
clock back, reboot. ``run`` advances true time a heartbeat at a time and records when the gate
served new requests.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from license_server.app import IssueRequest, LicenseService, build_app
from license_server.db import LicenseStore
from serve_app.licensing import LicenseConfig, LicenseGate
from serve_app.licensing.actor import LicenseActor
from tests.fakes import VENDOR_KEY, Clocks, LicenseWire

# Long intervals keep hours of simulated time to a few hundred steps.
HEARTBEAT_S = 300.0
GRACE_S = 4 * 3600.0
DAY = 86400.0


class Site:
    def __init__(self, folder: Path, *, key: str | None = None, service: LicenseService | None = None,
                 clock: Clocks | None = None) -> None:
        self.folder = folder
        self.clock = clock or Clocks()
        if service is None:
            store = LicenseStore(f"sqlite:///{folder / 'vendor.db'}", now=self.clock).start()
            service = LicenseService(store, VENDOR_KEY, "http://license.test", now=self.clock)
        self.service = service
        self.wire = LicenseWire(build_app(service, "admin"), server_now=self.clock)
        if key is None:
            self.license, key = service.issue(IssueRequest(
                customer="ACME", models=("*",), heartbeat_interval_s=HEARTBEAT_S,
                grace_period_s=GRACE_S))
            self.wire.issued_at = self.license.issued_at
        self.config = LicenseConfig(key=SecretStr(key), ledger_path=str(folder / "ledger.db"),
                                    report_interval_s=600)
        self.boot = "boot-1"
        self.replicas = ("r1", "r2")
        self.actor: LicenseActor | None = None
        self.gate: LicenseGate | None = None
        self.actor_alive = False
        self.served: list[tuple[float, str | None]] = []  # (true time, refusal code or None)

    # -- the stack -------------------------------------------------------------------------------

    async def start(self) -> Site:
        """Start (or restart) the actor and an ingress, and the replicas registering."""
        self.actor = LicenseActor(self.config, now=self.clock.wall, monotonic=self.clock.mono,
                                  transport=self.wire, autostart=False, boot_id=lambda: self.boot)
        self.actor_alive = True
        for replica in self.replicas:
            await self.actor.register(replica, "m", 0.0)
        self.gate = LicenseGate(self._state, now=self.clock.mono)
        await self.beat()
        return self

    async def restart_actor(self) -> None:
        """Ray restarts the actor (its process died): the ingress's gate and the replicas live
        on; the replicas' next heartbeats register them again if the ledger forgot them."""
        if self.actor_alive:
            self.stop()
        self.actor = LicenseActor(self.config, now=self.clock.wall, monotonic=self.clock.mono,
                                  transport=self.wire, autostart=False, boot_id=lambda: self.boot)
        self.actor_alive = True
        await self.beat()

    async def _state(self) -> dict:
        if not self.actor_alive:
            raise RuntimeError("the license actor is gone")
        assert self.actor is not None
        return await self.actor.state()

    async def beat(self) -> None:
        """One heartbeat interval's work: replicas heartbeat, the actor checks in (if it can),
        the ingress refreshes its gate."""
        if self.actor_alive:
            assert self.actor is not None
            for replica in self.replicas:
                await self.actor.heartbeat(replica, "m", 0.0)
            await self.actor._step()  # the actor's loop, less its wait
        assert self.gate is not None
        await self.gate.refresh()

    def refusal(self) -> str | None:
        assert self.gate is not None
        refused = self.gate.refusal()
        return None if refused is None else refused["code"]

    async def run(self, seconds: float) -> None:
        """``seconds`` of true time, a heartbeat interval at a time, recording each step."""
        end = self.clock.t + seconds
        while self.clock.t < end - 1e-6:
            self.clock.advance(min(HEARTBEAT_S, end - self.clock.t))
            await self.beat()
            self.served.append((self.clock.t, self.refusal()))

    def stopped_serving_at(self) -> float | None:
        """The first recorded time new requests were refused, after the last time they were
        served; None if they are served at the end."""
        if not self.served or self.served[-1][1] is None:
            return None
        last_served = max((t for t, code in self.served if code is None), default=None)
        return min(t for t, code in self.served if code is not None
                   and (last_served is None or t > last_served))

    def lease_expiry(self) -> float:
        """When the lease of the last successful check-in ends, in true (server) time."""
        assert self.actor is not None and self.actor._lease is not None
        return self.actor._lease.expires_at

    # -- the customer's moves -------------------------------------------------------------------

    def cut_network(self) -> None:
        self.wire.up = False

    def kill_actor(self) -> None:
        """The actor dies and nothing restarts it; the ingress's gate lives on."""
        self.actor_alive = False

    def stop(self) -> None:
        assert self.actor is not None
        self.actor._ledger.close()
        self.actor_alive = False

    def delete_ledger(self) -> None:
        if self.actor_alive:
            self.stop()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.config.ledger_path}{suffix}").unlink(missing_ok=True)

    def set_wall_clock_back(self, seconds: float) -> None:
        self.clock.skew -= seconds

    def reboot(self, down_s: float) -> None:
        """The host goes down for ``down_s`` and boots again: monotonic time starts over."""
        self.stop()
        self.clock.advance(down_s)
        self.clock.reboot()
        self.boot = f"boot-{int(self.boot.split('-')[1]) + 1}"

    # -- what the vendor sees -------------------------------------------------------------------

    def flags(self) -> list[dict]:
        page = self.service.usage(self.license.license_id)
        return [f for row in page["usage"] for f in row["flags"]] + page["alerts"]
