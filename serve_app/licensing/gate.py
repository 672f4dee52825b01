"""What replicas hold of the license actor: the ingress's cached decision and lease
(``LicenseGate``) and an LLM replica's registration and heartbeats (``InstanceReporter``).
Nothing on the request path calls the actor: both talk to it from background tasks.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from license_contract import LeaseError, verify_lease
from serve_app.licensing.failure_log import FailureLog
from serve_app.licensing.policy import AIRGAP_RENEW, OVERDUE_RETRY_S, PENDING_RETRY_S

logger = logging.getLogger("ray.serve")

PENDING = {"allowed": False, "status": 503, "code": "license_pending",
           "retry_after_s": PENDING_RETRY_S,
           "message": "The license is being checked; retry in a moment."}
EXPIRED = {"allowed": False, "status": 503, "code": "license_lease_expired",
           "retry_after_s": OVERDUE_RETRY_S,
           "message": "The license's lease has run out and the license actor has not renewed "
                      "it: new requests wait for a check-in with the license server."}

AIRGAP_EXPIRED = {"allowed": False, "status": 503, "code": "license_airgap_lease_expired",
                  "retry_after_s": OVERDUE_RETRY_S,
                  "message": f"The air-gapped license's lease has run out: {AIRGAP_RENEW}."}


class LicenseGate:
    """The ingress's cached license decision and the lease it rests on, refreshed in the
    background from the actor's ``state``.

    The gate keeps the signed lease itself: it verifies each new one once (signed by the
    license's signer, for the license and cluster the actor's state names), and gives it a
    deadline on this process's monotonic clock, receipt + (expiry - server time at receipt),
    never later than the life the actor gives it. ``refusal()`` is then a comparison in memory.
    While the actor cannot be read (it restarts, its node is gone, it was killed) the last
    decision stands until that deadline, and new requests are refused from then on. The
    failure is logged once, then once a minute with a count (``FailureLog``)."""

    def __init__(self, fetch: Callable[[], Any], refresh_s: float = 1.0, *,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 now: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch  # async () -> state dict; the actor's ``state`` in production
        self._refresh_s = refresh_s
        self._sleep = sleep
        self._now = now
        self._failures = FailureLog(logger, "Reading the license state", now=now)
        self._state: dict[str, Any] | None = None
        self._lease: str | None = None  # the text of the last lease seen, good or bad
        self._deadline: float | None = None  # monotonic; None: no good lease
        self._expires_at = 0.0  # the good lease's expiry, in server time
        self._bad_lease: dict[str, Any] | None = None

    @property
    def state(self) -> dict[str, Any] | None:
        """The actor's last state read."""
        return self._state

    @state.setter
    def state(self, state: dict[str, Any]) -> None:
        self._take(state, self._now())

    async def run(self) -> None:
        while True:
            await self.refresh()
            await self._sleep(self._refresh_s)

    async def refresh(self) -> None:
        """Read the actor's state once (what ``run`` does every ``refresh_s``)."""
        try:
            state = await self._fetch()
        except Exception as exc:  # actor restarting: keep the last decision and lease
            self._failures.failed(exc)
        else:
            self._failures.recovered()
            self._take(state, self._now())

    def _take(self, state: dict[str, Any], received: float) -> None:
        text = state.get("lease")
        if text is None:
            self._lease, self._deadline, self._bad_lease = None, None, None
        elif text != self._lease:
            self._lease, self._deadline, self._bad_lease = text, None, None
            try:
                lease = verify_lease(text, signer=state["signer"], license_id=state["license_id"],
                                     cluster_id=state["cluster_id"], now=state["server_now"])
            except (LeaseError, KeyError, TypeError) as exc:
                code = getattr(exc, "code", "lease_malformed")
                logger.error("License gate: the actor's lease is refused (%s): %s", code, exc)
                self._bad_lease = {
                    "allowed": False, "status": 503, "code": "license_lease_invalid",
                    "retry_after_s": OVERDUE_RETRY_S,
                    "message": f"The license's lease does not verify ({code}): new requests "
                               "wait for a valid one."}
            else:
                self._expires_at = lease.expires_at
                self._deadline = received + self._life(state)
        elif self._deadline is not None:  # the same lease: a later reading can only shorten it
            self._deadline = min(self._deadline, received + self._life(state))
        self._state = state

    def _life(self, state: dict[str, Any]) -> float:
        life = self._expires_at - float(state["server_now"])
        left = state.get("lease_left_s")
        return life if left is None else min(life, float(left))

    def refusal(self) -> dict[str, Any] | None:
        """None when new requests may be served. Memory and the monotonic clock only."""
        state = self._state
        if state is None:
            return PENDING
        if not state["allowed"]:
            return state
        if self._deadline is None:
            return self._bad_lease or PENDING
        if self._now() >= self._deadline:
            return AIRGAP_EXPIRED if state.get("air_gapped") else EXPIRED
        return None


class InstanceReporter:
    """Registers an LLM replica with the actor and heartbeats for it until it stops."""

    def __init__(self, actor: Any, model: str, gpus: float) -> None:
        self._actor = actor
        self._model = model
        self._gpus = gpus
        self.instance_id = f"inst_{uuid.uuid4().hex[:16]}"
        self._task: asyncio.Task[None] | None = None
        self.cluster_id: str | None = None  # the cluster the actor bills, once registered

    async def start(self) -> None:
        answer = await self._actor.register.remote(self.instance_id, self._model, self._gpus)
        if not answer["ok"]:
            raise RuntimeError(f"Not starting this replica: {answer['reason']}")
        interval = float(answer["heartbeat_interval_s"])
        self.cluster_id = answer.get("cluster_id")
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
