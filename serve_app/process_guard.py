"""Processes that cannot outlive the process that started them.

Ray ends most of the stack's processes when the driver dies: it starts its GCS and raylet with
a parent-death signal, and a worker whose raylet is gone exits. Its agents (dashboard agent,
runtime-env agent) watch the raylet too, but were seen alive more than a minute after the
driver was killed; ``guard_descendants``, right after ``ray.init``, ends them with the driver.

vLLM's engine core is a child of the replica (a Ray worker); it handles SIGTERM itself, and
nothing in it watches the replica. A replica that dies abruptly (SIGKILL, the OOM killer, Ray
giving up on a graceful stop) can leave an engine core behind, holding the model's memory (on
a GPU, the GPU's) and spinning on its work queue. ``guard_children`` closes that gap from
outside the engine: a small watchdog process waits for the replica to end and then kills the
engine's process tree. It needs no code inside vLLM's processes, so it works whatever state
they are in.

``die_with_parent`` is the same guarantee for processes we start ourselves (the local license
server), through the kernel.

Run as ``python -m serve_app.process_guard PARENT_PID PID...``: the watchdog itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent ends (Linux; elsewhere a
    no-op). Meant for ``subprocess.Popen(preexec_fn=...)``: it then runs in the child."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def guard_children() -> subprocess.Popen[bytes] | None:
    """``guard`` this process's current ``multiprocessing`` children: vLLM's engine core, when
    called right after ``AsyncLLM`` has started it."""
    return guard([p.pid for p in multiprocessing.active_children() if p.pid is not None])


def guard_descendants() -> subprocess.Popen[bytes] | None:
    """``guard`` every process under this one as of now (Ray's GCS, raylet and agents, right
    after ``ray.init``)."""
    return guard(descendants(os.getpid()))


def guard(pids: list[int]) -> subprocess.Popen[bytes] | None:
    """Start a watchdog that kills ``pids``, and everything under them, once this process ends.

    The watchdog exits by itself when the guarded processes are gone (they were stopped
    normally) or after it has killed them. It holds a pidfd of each from the start, so a
    guarded process is found even after it was reparented, and a recycled pid is never hit.
    Linux only; elsewhere (and with nothing to guard) it returns None.
    """
    if not hasattr(os, "pidfd_open") or not pids:
        return None
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve_app.process_guard", str(os.getpid()), *map(str, pids)],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, close_fds=True,
    )
    assert proc.stdout is not None
    # Guarding from here on: its pidfds are open and stop signals ignored.
    if proc.stdout.readline() != b"guarding\n":
        logger.warning("a process guard did not start (exit code %s)", proc.wait())
    proc.stdout.close()
    return proc


def descendants(pid: int) -> list[int]:
    """Every process under ``pid``, read from /proc (children of every thread)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    for child in f.read().split():
                        found.append(int(child))
                        stack.append(int(child))
    return found


def _kill_tree(pidfd: int, pid: int) -> bool:
    """Whether ``pid`` was still running. Children first, listed while their parent still
    lives (afterwards they would be reparented and lost); the guarded process itself through
    its pidfd, which cannot hit a recycled pid."""
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            os.kill(child, signal.SIGKILL)
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def watch(parent: int, pids: list[int]) -> int:
    """Block until ``parent`` ends, then kill ``pids`` and their descendants; return early
    when they have all ended on their own. Returns how many were killed."""
    # The signals that stop the stack around us (Ctrl-C, SIGTERM to a process group) must
    # not stop the guard before the processes it guards.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    guarded: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            guarded[os.pidfd_open(pid)] = pid
    try:
        parent_fd = os.pidfd_open(parent)
    except ProcessLookupError:
        parent_fd = None
    with contextlib.suppress(OSError):  # the parent may be gone already
        print("guarding", flush=True)
    poller = select.poll()
    for fd in guarded:
        poller.register(fd, select.POLLIN)
    if parent_fd is not None:
        poller.register(parent_fd, select.POLLIN)
    # The parent may have ended before its pidfd was opened: then we are already reparented.
    while guarded and parent_fd is not None and os.getppid() == parent:
        for fd, _ in poller.poll():
            if fd == parent_fd:
                parent_fd = None
                break
            poller.unregister(fd)
            guarded.pop(fd)
            os.close(fd)
    return sum(_kill_tree(fd, pid) for fd, pid in guarded.items())


def main(argv: list[str] | None = None) -> None:
    args = [int(a) for a in (sys.argv[1:] if argv is None else argv)]
    killed = watch(args[0], args[1:])
    if killed:
        print(f"process_guard: process {args[0]} ended; killed {killed} process(es) it had "
              "started", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
