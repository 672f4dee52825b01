"""A worker node vanishes (its raylet SIGKILLed, as when a VM dies): the license actor stops
counting its replica within two heartbeats, the replica's usage ends at its last heartbeat,
nothing it accrued is lost or counted twice between the ledger and the license server, and
the cluster serves again from a replacement node."""

from __future__ import annotations

import sqlite3
import time

import pytest

from tests.cluster.conftest import HEARTBEAT_S
from tests.conftest import wait_for

pytestmark = pytest.mark.cluster


def instance_row(ledger_path: str, instance_id: str) -> dict:
    """The ledger's record of one instance: state, times and accrued seconds (read-only)."""
    db = sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True)
    try:
        stopped, registered, last_seen = db.execute(
            "SELECT stopped, registered_at, last_seen FROM instances WHERE instance_id = ?",
            (instance_id,)).fetchone()
        (seconds,) = db.execute('SELECT COALESCE(SUM("end" - start), 0) FROM intervals '
                                "WHERE instance_id = ?", (instance_id,)).fetchone()
    finally:
        db.close()
    return {"stopped": stopped, "registered_at": registered, "last_seen": last_seen,
            "seconds": seconds}


def test_a_lost_node_loses_no_usage_and_over_counts_none(licensed_app):
    cluster = licensed_app.cluster
    wait_for(lambda: licensed_app.running() >= 1, timeout=180, interval=1,
             what="a running replica")
    victim = licensed_app.chat()
    node, instance = victim["node_id"], victim["instance_id"]
    assert node in cluster.nodes_of_type("gpu_l4")
    path = licensed_app.license.ledger_path
    wait_for(lambda: instance_row(path, instance)["seconds"] > 0, timeout=30,
             what="the replica's first heartbeat")

    killed_at = time.time()
    pids = cluster.kill_node(node)
    assert len(pids) > 1  # the raylet and at least the replica's worker

    def gone() -> float | None:
        licensed_app.status()  # the count as the status route and the server see it
        return time.time() if instance_row(path, instance)["stopped"] else None

    gone_at = wait_for(gone, timeout=4 * HEARTBEAT_S + 10, interval=0.2,
                       what="the lost node's replica to leave the count")
    # Expired two heartbeat intervals after its last heartbeat (which came before the kill);
    # the slack is this busy box's latency of one status call.
    assert gone_at - killed_at <= 2 * HEARTBEAT_S + 1.5
    row = instance_row(path, instance)
    assert row["last_seen"] <= killed_at + 0.5
    # Every second between its registration and its last heartbeat is in the ledger, once.
    assert row["seconds"] == pytest.approx(row["last_seen"] - row["registered_at"], abs=1e-3)

    # The cluster serves again: Serve replaces the replica, the autoscaler the node.
    wait_for(lambda: licensed_app.chat()["node_id"] != node, timeout=240, interval=1,
             what="a replacement replica on another node")
    assert node not in {n["NodeID"] for n in cluster.nodes()}
    ledger, server = licensed_app.totals()
    assert server == pytest.approx(ledger, abs=1e-3)
    # Many heartbeats later, the dead replica has accrued nothing more.
    assert instance_row(path, instance)["seconds"] == row["seconds"]
