"""What a replica keeps of its keys, and the background round that keeps it current.

``UsageMeter`` counts requests and tokens per UTC day, key and model in memory; ``KeySync``
hands them to the key actor about once a second, with the requests asked of each key, and takes
back the key table (when its version moved), this replica's shares of the limits and its
sibling replicas. A round that fails changes nothing here: the table, shares and peers stand,
and the usage goes with the next round (the actor applies each report once, by sequence).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from serve_app.licensing import FailureLog
from serve_app.tenants.limits import Limiter
from serve_app.tenants.table import KeyTable

logger = logging.getLogger("ray.serve")

Fetch = Callable[[str, "int | None", dict[str, Any]], Awaitable[dict[str, Any]]]


class UsageMeter:
    """Requests, prompt and completion tokens per (UTC day, key, model), since the last drain."""

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self._now = now
        self._rows: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])

    def add(self, key: str, model: str, requests: int = 0, prompt_tokens: int = 0,
            completion_tokens: int = 0) -> None:
        day = time.strftime("%Y-%m-%d", time.gmtime(self._now()))
        row = self._rows[(day, key, model)]
        row[0] += requests
        row[1] += prompt_tokens
        row[2] += completion_tokens

    def drain(self) -> list[list[Any]]:
        rows = [[*k, *v] for k, v in self._rows.items()]
        self._rows.clear()
        return rows


class KeySync:
    def __init__(self, fetch: Fetch, table: KeyTable, limiter: Limiter, meter: UsageMeter, *,
                 replica_id: str, peer: dict[str, str] | None = None, refresh_s: float = 1.0,
                 goodbye: Callable[[str, list[Any]], Awaitable[Any]] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._fetch = fetch  # the key actor's ``sync`` in production
        self._goodbye = goodbye
        self.table = table
        self.limiter = limiter
        self.meter = meter
        self.replica_id = replica_id
        self.peer = peer
        self._refresh_s = refresh_s
        self._sleep = sleep
        self._seq = 0
        self._unacked: list[list[Any]] = []
        self._failures = FailureLog(logger, "Syncing with the key actor")
        self.peers: list[tuple[str, str]] = []

    def _report(self) -> dict[str, Any]:
        rows = self.meter.drain()
        if rows:
            self._seq += 1
            self._unacked.append([self._seq, rows])
        return {"usage": list(self._unacked), "asked": self.limiter.demand(), "peer": self.peer}

    async def once(self) -> None:
        answer = await self._fetch(self.replica_id, self.table.version, self._report())
        self._unacked = []
        if answer.get("table") is not None:
            self.table.load(answer["table"])
        shares = {name: (float(s), None if n is None else int(n))
                  for name, (s, n) in answer.get("shares", {}).items()}
        self.limiter.forget(set(shares))
        self.limiter.apply(shares, 1.0 / max(1, int(answer.get("replicas", 1))))
        self.peers = [tuple(p) for p in answer.get("peers", ())]

    async def first(self, timeout_s: float = 120.0) -> None:
        """The first round, retried until it succeeds: a replica serves only once it holds the
        key table (without it every named key would be refused)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await self.once()
            except Exception as exc:
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"the key actor did not answer: {exc!r}") from exc
                self._failures.failed(exc)
                await self._sleep(min(self._refresh_s, 1.0))
            else:
                self._failures.recovered()
                return

    async def run(self) -> None:
        while True:
            await self._sleep(self._refresh_s)
            try:
                await self.once()
            except Exception as exc:  # actor restarting: keep what we hold
                self._failures.failed(exc)
            else:
                self._failures.recovered()

    async def stop(self) -> None:
        """The last usage, and this replica's shares freed for the others."""
        if self._goodbye is None:
            return
        report = self._report()
        try:
            await asyncio.wait_for(self._goodbye(self.replica_id, report["usage"]), 5.0)
        except Exception as exc:
            logger.warning("Usage of this replica's last second not delivered to the key "
                           "actor: %r", exc)
