"""The singleton license actor and the two small clients that talk to it.

One detached, named, restartable actor per cluster (``get_if_exists``, ``max_restarts=-1``,
``num_cpus=0``, on the head node) verifies the key, activates with the vendor's license server,
takes registrations and heartbeats from LLM replicas, accrues instance-seconds into the durable
ledger and reports them exactly once. A restart re-runs ``__init__``: everything that counts is
in the ledger, so nothing is lost.

Nothing on the request path calls the actor: the ingress polls ``state()`` in the background
(``LicenseGate``) and checks a cached decision; replicas heartbeat from a background task
(``InstanceReporter``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx

from serve_app.config import LicenseConfig
from serve_app.ledger import UsageLedger
from serve_app.licensing import (
    Decision,
    License,
    LicenseError,
    decide,
    load_public_key,
    verify_key,
)

logger = logging.getLogger("ray.serve")

MAX_BACKOFF_S = 60.0


class LicenseActor:
    """Counts instances, keeps the ledger, talks to the license server."""

    def __init__(self, config: LicenseConfig, now: Callable[[], float] = time.time,
                 transport: httpx.AsyncBaseTransport | None = None,
                 autostart: bool = True) -> None:
        self._config = config
        self._autostart = autostart  # tests drive _tick() themselves
        self._now = now
        self._transport = transport  # the seam tests use to cut or watch the network
        self._ledger = UsageLedger(config.ledger_path, now=now).start()
        self._cluster_id = self._ledger.cluster_id()
        started = self._ledger.get_meta("first_started_at")
        if started is None:
            started = str(now())
            self._ledger.set_meta("first_started_at", started)
        self._started_at = float(started)
        self._license: License | None = None
        self._invalid: str | None = None
        try:
            self._license = verify_key(config.key.get_secret_value(),
                                       load_public_key(config.public_key), now=now())
        except LicenseError as exc:
            self._invalid = str(exc)
            logger.error("License refused, the app will not serve: %s", exc)
        # Check-in state belongs to one license: a new key starts clean.
        self._meta_suffix = f":{self._license.license_id}" if self._license else ":invalid"
        last = self._ledger.get_meta("last_checkin" + self._meta_suffix)
        self._last_checkin = float(last) if last else None
        self._server_status = self._ledger.get_meta("server_status" + self._meta_suffix) or "unknown"
        self._last_error: str | None = None
        self._last_seal = now()
        self._task: asyncio.Task[None] | None = None

    def _ensure_running(self) -> None:
        # Async actors have no running loop in __init__; the first call starts the loop.
        if self._autostart and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run())

    # -- called by replicas ------------------------------------------------------------------

    async def register(self, instance_id: str, model: str, gpus: float) -> dict[str, Any]:
        """Admit a new LLM replica, or refuse it (invalid license, model not entitled, cap)."""
        self._ensure_running()
        lic = self._license
        if lic is None:
            return {"ok": False, "reason": self._invalid or "no valid license"}
        if not lic.allows_model(model):
            return {"ok": False, "reason": f"license {lic.license_id} does not cover model "
                                           f"{model!r} (covers: {', '.join(lic.models)})"}
        live = {i["instance_id"] for i in self._ledger.live()}
        caps = [c for c in (lic.max_instances, self._config.max_instances) if c]
        if instance_id not in live and caps and len(live) >= min(caps):
            reason = (f"instance cap reached ({len(live)} running, cap {min(caps)}): "
                      "not starting another replica; running ones are untouched")
            logger.warning("License: %s", reason)
            return {"ok": False, "reason": reason}
        self._ledger.register(instance_id, model, gpus)
        return {"ok": True, "heartbeat_interval_s": lic.heartbeat_interval_s}

    async def heartbeat(self, instance_id: str, model: str, gpus: float) -> bool:
        self._ensure_running()
        if not self._ledger.heartbeat(instance_id):
            # Unknown here (e.g. the ledger was lost): it is running, so count it again.
            self._ledger.register(instance_id, model, gpus)
        return True

    async def deregister(self, instance_id: str) -> None:
        self._ledger.deregister(instance_id)

    # -- called by the ingress and operators ---------------------------------------------------

    async def state(self) -> dict[str, Any]:
        """The decision for new requests, computed now."""
        self._ensure_running()
        d = self._decision()
        return {"allowed": d.allowed, "status": d.status, "code": d.code, "message": d.message}

    async def status(self) -> dict[str, Any]:
        """The customer's view: what the status route and CLI print."""
        self._ensure_running()
        lic = self._license
        d = self._decision()
        totals = self._ledger.totals()
        live = self._ledger.live()
        return {
            "license_id": lic.license_id if lic else None,
            "customer": lic.customer if lic else None,
            "expires_at": lic.expires_at if lic else None,
            "state": d.code,
            "message": d.message,
            "server_status": self._server_status,
            "grace_left_s": round(d.grace_left_s, 1),
            "last_checkin_at": self._last_checkin,
            "instances_now": len(live),
            "gpus_now": sum(i["gpus"] for i in live),
            "instance_seconds_total": round(totals["instance_seconds"], 3),
            "seconds_pending_delivery": round(totals["pending_seconds"], 3),
            "last_report_at": totals["last_report_at"],
            "last_error": self._last_error,
            "cluster_id": self._cluster_id,
        }

    async def flush(self) -> dict[str, float]:
        """Seal and deliver now (tests and shutdown); returns the ledger totals. A heartbeat
        handled while a report is on the wire accrues new time, so deliver until none is
        pending (a few rounds at most: heartbeats are seconds apart, reports milliseconds)."""
        for _ in range(5):
            await self._report(force=True)
            totals = self._ledger.totals()
            if not totals.get("pending_seconds"):
                break
        return totals

    def _decision(self) -> Decision:
        return decide(self._license, now=self._now(), last_checkin=self._last_checkin,
                      revoked=self._server_status == "revoked", invalid_reason=self._invalid,
                      started_at=self._started_at)

    # -- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            lic = self._license
            interval = lic.heartbeat_interval_s if lic else 30.0
            try:
                await self._tick()
                failures = 0
                self._last_error = None
                delay = interval
            except Exception as exc:  # the server is down or answers badly: back off, go on
                failures += 1
                self._last_error = repr(exc)[:300]
                delay = min(interval * 2 ** min(failures, 6), max(MAX_BACKOFF_S, interval))
                logger.warning("License server unreachable (%s); retrying in %.0f s",
                               self._last_error, delay)
            await asyncio.sleep(delay)

    def _client(self) -> httpx.AsyncClient:
        assert self._license is not None
        return httpx.AsyncClient(
            base_url=self._license.server_url, transport=self._transport, timeout=10.0,
            headers={"Authorization": f"Bearer {self._config.key.get_secret_value()}"})

    async def _tick(self) -> None:
        lic = self._license
        if lic is None:
            return
        self._ledger.expire(2 * lic.heartbeat_interval_s)
        live = len(self._ledger.live())
        async with self._client() as client:
            if self._ledger.get_meta("activated" + self._meta_suffix) is None:
                resp = await client.post("/v1/activate", json={"cluster_id": self._cluster_id})
                resp.raise_for_status()
                self._ledger.set_meta("activated" + self._meta_suffix, str(self._now()))
            resp = await client.post("/v1/heartbeat",
                                     json={"cluster_id": self._cluster_id, "instances": live})
            resp.raise_for_status()
            self._checked_in(resp.json()["status"])
        await self._report()

    def _checked_in(self, server_status: str) -> None:
        now = self._now()
        self._last_checkin = now
        self._server_status = server_status
        self._ledger.set_meta("last_checkin" + self._meta_suffix, str(now))
        self._ledger.set_meta("server_status" + self._meta_suffix, server_status)

    async def _report(self, force: bool = False) -> None:
        if self._license is None:
            return
        if force or self._now() - self._last_seal >= self._config.report_interval_s:
            self._ledger.seal_report()
            self._last_seal = self._now()
        pending = self._ledger.pending_reports()
        if not pending:
            return
        async with self._client() as client:
            for report in pending:
                # Only ids, timestamps, durations and GPU counts leave the cluster.
                resp = await client.post("/v1/usage", json={
                    "cluster_id": self._cluster_id, "report_id": report.report_id,
                    "intervals": report.intervals})
                resp.raise_for_status()
                self._ledger.mark_delivered(report.report_id)


# -- Ray plumbing --------------------------------------------------------------------------------


def get_license_actor(config: LicenseConfig) -> Any:
    """The cluster's singleton, created by whichever process asks first, on the head node:
    the ledger lives there, and the head outlives worker nodes (``ray_internals`` says how
    the head is found)."""
    import ray

    from serve_app.ray_internals import head_node_options

    try:  # the usual case, and no need to find the head
        return ray.get_actor(config.actor_name, namespace=config.namespace)
    except ValueError:
        pass
    return (ray.remote(LicenseActor).options(
        name=config.actor_name, namespace=config.namespace, lifetime="detached",
        get_if_exists=True, max_restarts=-1, max_task_retries=-1, num_cpus=0,
        runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}},
        **head_node_options(),
    ).remote(config))


class LicenseGate:
    """The ingress's cached license decision, refreshed in the background."""

    def __init__(self, fetch: Callable[[], Any], refresh_s: float = 1.0) -> None:
        self._fetch = fetch  # async () -> state dict; the actor's ``state`` in production
        self._refresh_s = refresh_s
        self.state: dict[str, Any] | None = None

    async def run(self) -> None:
        while True:
            try:
                self.state = await self._fetch()
            except Exception as exc:  # actor restarting: keep the last decision
                logger.warning("License state unavailable: %r", exc)
            await asyncio.sleep(self._refresh_s)

    def refusal(self) -> dict[str, Any] | None:
        """None when new requests may be served."""
        state = self.state
        if state is None:
            return {"allowed": False, "status": 503, "code": "license_pending",
                    "message": "The license is being checked; retry in a moment."}
        return None if state["allowed"] else state


class InstanceReporter:
    """Registers an LLM replica with the actor and heartbeats for it until it stops."""

    def __init__(self, actor: Any, model: str, gpus: float) -> None:
        self._actor = actor
        self._model = model
        self._gpus = gpus
        self.instance_id = f"inst_{uuid.uuid4().hex[:16]}"
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        answer = await self._actor.register.remote(self.instance_id, self._model, self._gpus)
        if not answer["ok"]:
            raise RuntimeError(f"Not starting this replica: {answer['reason']}")
        interval = float(answer["heartbeat_interval_s"])
        self._task = asyncio.get_running_loop().create_task(self._beat(interval))

    async def _beat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self._actor.heartbeat.remote(self.instance_id, self._model, self._gpus)
            except Exception as exc:  # the actor restarts; the next beat catches up
                logger.warning("License heartbeat failed: %r", exc)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        try:
            self._actor.deregister.remote(self.instance_id)
        except Exception:  # shutting down anyway; the actor expires us after 2 intervals
            pass
