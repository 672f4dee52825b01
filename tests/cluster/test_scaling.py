"""Scaling for real: load through the front door makes Serve add a replica (our in-flight
policy) and Ray's autoscaler add the GPU node it needs; requests then reach replicas on both
nodes; when the load stops, the replica and then the node go away. The license counts each."""

from __future__ import annotations

import pytest

from tests.cluster.load import StreamLoad
from tests.conftest import wait_for

pytestmark = pytest.mark.cluster


def test_load_scales_replicas_and_nodes_up_and_idleness_scales_them_down(licensed_app):
    cluster = licensed_app.cluster
    gpu_nodes = lambda: set(cluster.nodes_of_type("gpu_l4"))  # noqa: E731
    licensed_app.settle()  # one replica on one GPU node before the load
    first = gpu_nodes()

    # Six streams against a target of two per replica: Serve wants three, the app's max is two.
    with StreamLoad(licensed_app.url, 6) as load:
        wait_for(lambda: licensed_app.running() == 2, timeout=180, interval=1,
                 what="Serve to add a replica under load")
        wait_for(lambda: len(gpu_nodes()) == 2, timeout=60, interval=1,
                 what="the autoscaler's second GPU node")
        both = gpu_nodes()
        assert first < both
        # Through the one front door, requests reach the replicas of both nodes.
        wait_for(lambda: load.nodes == both, timeout=60, interval=0.5,
                 what=f"streams served from both GPU nodes (so far {load.nodes})")
        served = {licensed_app.chat()["node_id"] for _ in range(20)}
        assert served == both
        assert licensed_app.status()["instances_now"] == 2
    assert load.completed > 0 and not load.failures, load.failures[:3]

    wait_for(lambda: licensed_app.running() == 1, timeout=120, interval=1,
             what="Serve to drop the idle replica")
    wait_for(lambda: len(gpu_nodes()) == 1, timeout=120, interval=1,
             what="the autoscaler to remove the idle GPU node")
    wait_for(lambda: licensed_app.status()["instances_now"] == 1, timeout=30,
             what="the license count to follow")
    ledger, server = licensed_app.totals()
    assert ledger > 0 and server == pytest.approx(ledger, abs=1e-3)
