"""CPU placement on CPU-only boxes, where vLLM's engine and our frontends share few cores.

vLLM's CPU backend binds its engine threads to all allowed cores but the last
(``VLLM_CPU_NUM_OF_RESERVED_CPU`` defaults to one reserved core, meant for the API server;
``reserved_cores`` says when we give that core to the engine too).
Linux still schedules other processes onto the engine's cores, and every Ray process (GCS,
raylet, proxy, ingress, the replica's own frontend loop) that lands there steals engine time.
Pinning those processes to the reserved core leaves the engine its cores to itself
(docs/performance.md has what it is worth). On GPU machines none of this is used.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from serve_app.vllm_internals import RESERVED_CPU_ENV

logger = logging.getLogger(__name__)


def frontend_cpus(allowed: set[int]) -> set[int]:
    """The core vLLM leaves to the frontend: the highest allowed one (all of one if alone)."""
    return {max(allowed)} if allowed else allowed


def pin_to_frontend() -> None:
    """Keep this process (every thread of it, and what it starts later) off the engine's cores.

    ``sched_setaffinity(0, ...)`` moves only the calling thread; Ray workers already run gRPC
    and event-loop threads, so each thread is moved.
    """
    try:
        allowed = _all_cpus()
        if len(allowed) < 2:
            return
        target = frontend_cpus(allowed)
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), target)
            except OSError:  # the thread ended meanwhile
                pass
    except (AttributeError, OSError) as exc:  # not Linux, or a cpuset forbids it
        logger.debug("CPU pinning skipped: %s", exc)


# Below this much weight a step is mostly serving overhead (scheduling, detokenizing, HTTP),
# not matrix work; real checkpoints are far above it (SmolLM2-135M in float32: ~540 MB).
SMALL_MODEL_BYTES = 100 << 20


def reserved_cores(setting: int | None, cpus: int, weight_bytes: int) -> int | None:
    """How many cores vLLM's CPU engine leaves to the serving processes; None keeps vLLM's own
    default, one (``VLLM_CPU_NUM_OF_RESERVED_CPU``).

    On a 2-core box (Colab's CPU runtime, the smallest cloud VMs) that reserve halves the
    engine's compute: with SmolLM2, both cores to the engine measured faster at every
    concurrency and halved TTFT, although the serving processes then share a core with an
    engine thread. A tiny model gains nothing from a second engine thread and loses its
    serving core, so it keeps the reserve. With more cores a reserve costs 1/N of the compute
    and vLLM's default stays (docs/performance.md has the runs).
    """
    if setting is not None:
        return setting
    if cpus <= 2 and weight_bytes >= SMALL_MODEL_BYTES:
        return 0
    return None


def single_worker(world_size: int, engine_kwargs: Mapping[str, Any]) -> bool:
    """Whether vLLM's CPU model worker can run inside the engine-core process (the caller also
    honours ``cpu_inproc_worker``, which turns it off).

    vLLM on CPU always gives its worker a process of its own: three processes per engine (API
    frontend, engine core, worker) and a shared-memory round trip per step, with both ends
    busy-waiting on it (``sched_yield`` for up to a second). On a 2-core box those spinning
    waits take CPU from the frontend and the model. With one worker (no tensor or pipeline
    parallelism) the engine core can run it itself, which measured faster and lighter than
    vLLM's layout for both the tiny benchmark model and SmolLM2 (docs/performance.md). An
    explicit ``distributed_executor_backend`` in ``engine_kwargs`` wins.
    """
    return world_size == 1 and "distributed_executor_backend" not in engine_kwargs


def cpu_count() -> int:
    """The cores this process may use (the cgroup's cpuset)."""
    return len(_all_cpus())


def allowed_cpus() -> list[int]:
    """The cores this process may use (the cgroup's cpuset), in order."""
    return sorted(_all_cpus())


@contextlib.contextmanager
def engine_launch(reserved: int | None = None) -> Iterator[None]:
    """Processes started inside the block (vLLM's engine) see every core, since vLLM sizes and
    binds its engine from the affinity it inherits, and run at normal priority: Ray starts its
    workers at niceness 15 (``worker_niceness``), which children inherit, and a niced engine
    loses its core to every ordinary process that wakes up (it decodes measurably slower).
    Both are per-thread on Linux and restored for the caller afterwards. ``reserved`` (see
    ``reserved_cores``) reaches the engine through its environment."""
    with contextlib.ExitStack() as stack:
        if reserved is not None:
            stack.enter_context(_env(RESERVED_CPU_ENV, str(reserved)))
        try:
            saved = os.sched_getaffinity(0)
            os.sched_setaffinity(0, _all_cpus())
            stack.callback(os.sched_setaffinity, 0, saved)
        except (AttributeError, OSError):
            pass
        try:
            niceness = os.getpriority(os.PRIO_PROCESS, 0)
            if niceness > 0:
                os.setpriority(os.PRIO_PROCESS, 0, 0)  # needs CAP_SYS_NICE (root); else skipped
                stack.callback(os.setpriority, os.PRIO_PROCESS, 0, niceness)
        except (AttributeError, OSError):
            pass
        yield


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _all_cpus() -> set[int]:
    # The cores this cgroup may use, not merely the current process mask.
    try:
        with open("/sys/fs/cgroup/cpuset.cpus.effective") as f:
            text = f.read().strip()
        if text:
            return _parse_cpu_list(text)
    except OSError:
        pass
    return set(range(os.cpu_count() or 1))


def _parse_cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus
