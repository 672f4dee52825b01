from __future__ import annotations

import os
import threading

import pytest

from serve_app import affinity


def test_cpu_list_parsing_and_frontend_core():
    assert affinity._parse_cpu_list("0-3,6,8-9") == {0, 1, 2, 3, 6, 8, 9}
    assert affinity.frontend_cpus({0, 1, 2, 3}) == {3}
    assert affinity.frontend_cpus({5}) == {5}


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2,
                    reason="needs Linux and two cores")
def test_pinning_moves_every_thread_and_widening_restores():
    original = os.sched_getaffinity(0)
    started = threading.Event()
    done = threading.Event()
    seen: dict[str, set[int]] = {}

    def worker():
        started.set()
        done.wait(5)
        seen["worker"] = os.sched_getaffinity(0)

    thread = threading.Thread(target=worker)
    thread.start()
    started.wait(5)
    try:
        affinity.pin_to_frontend()
        target = affinity.frontend_cpus(affinity._all_cpus())
        assert os.sched_getaffinity(0) == target
        os.setpriority(os.PRIO_PROCESS, 0, 5)
        with affinity.engine_launch():
            assert os.sched_getaffinity(0) == affinity._all_cpus()
            if os.geteuid() == 0:
                assert os.getpriority(os.PRIO_PROCESS, 0) == 0
        assert os.getpriority(os.PRIO_PROCESS, 0) == 5
        assert os.sched_getaffinity(0) == target
        done.set()
        thread.join()
        assert seen["worker"] == target  # a thread that existed before was moved too
    finally:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        except OSError:
            pass
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), original)
            except OSError:
                pass
