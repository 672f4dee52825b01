"""What replicas hold of the license actor: the ingress's cached decision (``LicenseGate``) and
an LLM replica's registration and heartbeats (``InstanceReporter``). Nothing on the request path
calls the actor: both talk to it from background tasks.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from serve_app.licensing.failure_log import FailureLog

logger = logging.getLogger("ray.serve")


class LicenseGate:
    """The ingress's cached license decision, refreshed in the background.

    While the actor cannot be read (it restarts, its node is gone) the last decision stands;
    the failure is logged once, then once a minute with a count (``FailureLog``)."""

    def __init__(self, fetch: Callable[[], Any], refresh_s: float = 1.0, *,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 now: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch  # async () -> state dict; the actor's ``state`` in production
        self._refresh_s = refresh_s
        self._sleep = sleep
        self._failures = FailureLog(logger, "Reading the license state", now=now)
        self.state: dict[str, Any] | None = None

    async def run(self) -> None:
        while True:
            try:
                self.state = await self._fetch()
            except Exception as exc:  # actor restarting: keep the last decision
                self._failures.failed(exc)
            else:
                self._failures.recovered()
            await self._sleep(self._refresh_s)

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
