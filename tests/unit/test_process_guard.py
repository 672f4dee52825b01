"""process_guard with real processes: a stand-in replica (a Python process) starts a
``multiprocessing`` child the way vLLM starts its engine core, then guards it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from serve_app.process_guard import descendants
from tests.conftest import wait_for

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="Linux pidfds")

REPLICA = textwrap.dedent("""
    import json, multiprocessing, os, sys
    from serve_app.process_guard import descendants, guard_children

    if __name__ == "__main__":
        ctx = multiprocessing.get_context("spawn")
        # The engine has a process of its own under it, as vLLM's workers are.
        engine = ctx.Process(target=os.system, args=("sleep 600; true",))
        engine.start()
        guard = guard_children()
        print(json.dumps({"engine": engine.pid, "guard": guard.pid}), flush=True)
        sys.stdin.read()  # until the test closes stdin, or kills us
        for pid in descendants(engine.pid):  # a normal shutdown ends the engine's workers
            os.kill(pid, 9)
        engine.terminate()
        engine.join()
        guard.wait(timeout=30)
        print(json.dumps({"guard_exit": guard.returncode}), flush=True)
""")


def _start_replica() -> tuple[subprocess.Popen[str], dict]:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", REPLICA], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    return proc, json.loads(proc.stdout.readline())


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_engine_dies_with_a_killed_replica():
    proc, pids = _start_replica()
    worker = wait_for(lambda: descendants(pids["engine"]), timeout=20, interval=0.1,
                      what="the engine's own child")[0]
    try:
        assert not _gone(pids["engine"])
        # What stops the stack around the guard must not stop the guard itself.
        os.kill(pids["guard"], signal.SIGTERM)
        os.kill(pids["guard"], signal.SIGINT)
        proc.kill()
        proc.wait()
        wait_for(lambda: _gone(pids["engine"]), timeout=20, interval=0.1,
                 what="the orphaned engine to be killed")
        wait_for(lambda: _gone(worker), timeout=20, interval=0.1, what="the engine's child")
        wait_for(lambda: _gone(pids["guard"]), timeout=20, interval=0.1, what="the guard to exit")
    finally:
        for pid in (pids["engine"], pids["guard"], worker):
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_guard_exits_after_a_normal_engine_shutdown():
    proc, pids = _start_replica()
    out, _ = proc.communicate("", timeout=60)  # EOF: the replica shuts its engine down itself
    assert json.loads(out) == {"guard_exit": 0}
    assert proc.returncode == 0


def test_a_child_started_with_die_with_parent_dies_with_it():
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import subprocess, sys
            from serve_app.process_guard import die_with_parent
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                     preexec_fn=die_with_parent)
            print(child.pid, flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()})
    child = int(parent.stdout.readline())
    try:
        parent.kill()
        parent.wait()
        wait_for(lambda: _gone(child), timeout=20, interval=0.1, what="the child to die")
    finally:
        if not _gone(child):
            os.kill(child, signal.SIGKILL)
