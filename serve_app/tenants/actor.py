"""The key actor: one per key store, detached, named, restartable, on the head node beside the
store's SQLite file (``placement.py``).

Replicas call ``sync`` about once a second from a background task (``KeySync``), never on the
request path. One call carries everything both ways: the replica's usage since its last call
(added to the store once, by sequence number) and the requests it was asked per key; back come
the key table when it changed, the replica's shares of every limited key (``shares.py``), and
the loopback addresses of its sibling replicas on the same node (session affinity). A restart
re-runs ``__init__``: keys and usage are in the store, shares are rebuilt within a few rounds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from serve_app.tenants.shares import ShareBook
from serve_app.tenants.store import KeyStore


class KeyActor:
    def __init__(self, store_path: str, round_s: float = 1.0, stale_s: float = 5.0,
                 now: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._store = KeyStore(store_path, now=now).start()
        self._round_s = round_s
        self._monotonic = monotonic
        self._book = ShareBook(stale_s=stale_s, now=monotonic)
        self._table: dict[str, Any] | None = None
        self._last_round = -float("inf")
        self._rounds_for = -1  # the table version the shares were computed for
        self._peers: dict[str, dict[str, Any]] = {}

    def _current(self) -> dict[str, Any]:
        if self._table is None or self._table["version"] != self._store.version():
            self._table = self._store.table()
        return self._table

    def _limited(self, table: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {name: row for name, row in table["keys"].items() if not row["revoked"]
                and any(row.get(f) is not None for f in ("rpm", "tpm", "max_concurrent"))}

    async def sync(self, replica_id: str, version: int | None,
                   report: dict[str, Any]) -> dict[str, Any]:
        """A replica's round: see the module docstring. ``report`` holds ``usage`` (a list of
        ``[seq, rows]``, rows as ``KeyStore.record_usage`` takes them), ``asked`` (requests per
        key since its last round) and ``peer`` (``{"node": id, "url": loopback URL}`` or
        None)."""
        for seq, rows in report.get("usage", ()):
            self._store.record_usage(replica_id, int(seq), [tuple(r) for r in rows])
        self._book.report(replica_id, report.get("asked") or {})
        now = self._monotonic()
        peer = report.get("peer")
        if peer:
            self._peers[replica_id] = {**peer, "seen": now}
        table = self._current()
        limited = self._limited(table)
        if now - self._last_round >= self._round_s or self._rounds_for != table["version"]:
            self._book.rebalance(limited)
            self._last_round, self._rounds_for = now, table["version"]
        shares = self._book.shares(replica_id)
        slots = self._book.slots(replica_id, {n: r["max_concurrent"] for n, r in limited.items()
                                              if r["max_concurrent"] is not None})
        live = set(self._book.live())
        self._peers = {r: p for r, p in self._peers.items() if r in live}
        node = (peer or {}).get("node")
        return {
            "version": table["version"],
            "table": None if version == table["version"] else table,
            "shares": {n: [shares.get(n, 0.0), slots.get(n)] for n in limited},
            "replicas": max(1, len(live)),
            "peers": sorted((r, p["url"]) for r, p in self._peers.items()
                            if node is not None and p.get("node") == node),
        }

    async def goodbye(self, replica_id: str, usage: list[Any] | None = None) -> None:
        """A replica stopping: its last usage, and its shares and place freed at once."""
        for seq, rows in usage or ():
            self._store.record_usage(replica_id, int(seq), [tuple(r) for r in rows])
        self._book.forget(replica_id)
        self._peers.pop(replica_id, None)

    async def info(self) -> dict[str, Any]:
        """Where the actor runs and what it holds: its node, its store, the table's version and
        the replicas that synced recently."""
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(),
                "store": str(self._store.path), "version": self._store.version(),
                "replicas": self._book.live()}

    async def usage(self, first_day: str | None = None,
                    last_day: str | None = None) -> list[dict[str, Any]]:
        return self._store.usage(first_day, last_day)
