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


def test_reserved_cores_gives_a_two_core_box_to_real_models_only():
    big, tiny = 540 << 20, 6 << 20  # SmolLM2-135M in float32; the 1.5M benchmark model
    assert affinity.reserved_cores(None, 2, big) == 0
    assert affinity.reserved_cores(None, 1, big) == 0
    assert affinity.reserved_cores(None, 2, tiny) is None  # vLLM's default: one for serving
    assert affinity.reserved_cores(None, 8, big) is None
    assert affinity.reserved_cores(2, 2, big) == 2  # an explicit setting always wins
    assert affinity.reserved_cores(0, 64, tiny) == 0


def test_single_worker_only_without_parallelism_or_an_explicit_backend():
    assert affinity.single_worker(1, {})
    assert not affinity.single_worker(2, {})  # tensor or pipeline parallel: vLLM's processes
    assert not affinity.single_worker(1, {"distributed_executor_backend": "mp"})


def test_engine_launch_hands_the_reserve_to_the_engine_through_its_environment(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    with affinity.engine_launch(0):
        assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "3")
    with affinity.engine_launch(None):
        assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "3"
    with affinity.engine_launch(1):
        assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "3"
