"""A worker node vanishes (its raylet SIGKILLed, as when a VM dies): the license actor stops
counting its replica (after two silent heartbeat intervals: test_license_actor times that with
an injected clock), the replica's usage ends at its last heartbeat, nothing it accrued is lost
or counted twice between the ledger and the license server, and the cluster serves again from
a replacement node."""

from __future__ import annotations

import time

import pytest

from tests.cluster.conftest import HEARTBEAT_S
from tests.conftest import ledger_instances, wait_for

pytestmark = pytest.mark.cluster


def test_a_lost_node_loses_no_usage_and_over_counts_none(licensed_app):
    cluster = licensed_app.cluster
    licensed_app.settle()
    victim = licensed_app.chat()
    node, instance = victim["node_id"], victim["instance_id"]
    assert node in cluster.nodes_of_type("gpu_l4")
    path = licensed_app.license.ledger_path
    wait_for(lambda: ledger_instances(path)[instance]["seconds"] > 0, timeout=30,
             what="the replica's first heartbeat")

    pids = cluster.kill_node(node)
    assert len(pids) > 1  # the raylet and at least the replica's worker

    def gone() -> float | None:
        licensed_app.status()  # the count as the status route and the server see it
        return time.time() if ledger_instances(path)[instance]["stopped"] else None

    gone_at = wait_for(gone, timeout=4 * HEARTBEAT_S + 60, interval=0.2,
                       what="the lost node's replica to leave the count")
    row = ledger_instances(path)[instance]
    # Its usage ends at its last heartbeat, not when the actor noticed the silence: the actor
    # stops counting a replica two heartbeat intervals after its last heartbeat, so usage
    # billed up to the moment it stopped would end later than this. (The actor's clock reads
    # this machine's, to within its drift.)
    assert row["last_seen"] <= gone_at - 2 * HEARTBEAT_S + 0.05
    # Every second between its registration and its last heartbeat is in the ledger, once.
    assert row["seconds"] == pytest.approx(row["last_seen"] - row["registered_at"], abs=1e-3)

    # The cluster serves again: Serve replaces the replica, the autoscaler the node.
    wait_for(lambda: licensed_app.chat()["node_id"] != node, timeout=240, interval=1,
             what="a replacement replica on another node")
    assert node not in {n["NodeID"] for n in cluster.nodes()}
    ledger, server = licensed_app.totals()
    assert server == pytest.approx(ledger, abs=1e-3)
    # Many heartbeats later, the dead replica has accrued nothing more.
    assert ledger_instances(path)[instance] == row
