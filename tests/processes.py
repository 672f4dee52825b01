"""The processes a test session started, and the sockets they listen on.

Other stacks may run on the same machine (other sessions, other users), so a session's
processes are identified by a marker every one of them inherits in its environment
(``SESSION_ENV``, set before anything is started), or by the session's own Ray temp dir: in
their command line, or among their open files (Ray's agents retitle themselves with
setproctitle, which overwrites both their command line and their environment, but they keep
their log files there open).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

import psutil

SESSION_ENV = "SERVE_APP_TEST_SESSION"

# What must never outlive a stack: Ray's and vLLM's processes, by the names they give
# themselves (``ray::<Actor>``, ``VLLM::EngineCore``) or their executables.
STACK_NAMES = ("VLLM::", "ray::", "raylet", "gcs_server")


def _environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _holds_file_under(pid: int, directory: str) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(directory):
                return True
        except OSError:
            continue
    return False


@dataclass(frozen=True)
class Found:
    pid: int
    cmdline: str

    def __str__(self) -> str:
        return f"{self.pid}: {self.cmdline[:200]}"


def session_processes(marker: str, temp_dir: str | None = None,
                      variable: str = SESSION_ENV) -> list[Found]:
    """Live processes (not zombies) with ``variable=marker`` in their environment, or
    ``temp_dir`` in their command line or open files; never this process or its ancestors."""
    needle = f"{variable}={marker}".encode() + b"\0"
    exclude = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude:
            continue
        pid = int(name)
        cmdline = _cmdline(pid)
        if not cmdline:  # a zombie or a kernel thread, or gone
            continue
        if b"\0" + needle in b"\0" + _environ(pid) or (temp_dir and (
                temp_dir in cmdline or _holds_file_under(pid, temp_dir))):
            found.append(Found(pid, cmdline))
    return found


def stack_processes(found: list[Found]) -> list[Found]:
    """The Ray and vLLM processes among ``found``."""
    return [f for f in found if any(name in f.cmdline for name in STACK_NAMES)]


def is_loopback(host: str) -> bool:
    address = ipaddress.ip_address(host.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@dataclass(frozen=True)
class Socket:
    host: str
    port: int
    pid: int
    name: str

    def __str__(self) -> str:
        return f"{self.host}:{self.port} ({self.name}, pid {self.pid})"


def tree(root: int) -> list[psutil.Process]:
    proc = psutil.Process(root)
    return [proc, *proc.children(recursive=True)]


def listening(procs: list[psutil.Process]) -> list[Socket]:
    """TCP and UDP sockets ``procs`` listen on (UDP: bound)."""
    found = []
    for proc in procs:
        try:
            name = proc.name()
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN or (conn.status == psutil.CONN_NONE
                                                         and conn.laddr):
                    found.append(Socket(conn.laddr.ip, conn.laddr.port, proc.pid, name))
        except psutil.NoSuchProcess:
            continue
    return found


def dialled(procs: list[psutil.Process]) -> list[Socket]:
    """Remote ends of the connections ``procs`` hold."""
    found = []
    for proc in procs:
        try:
            name = proc.name()
            for conn in proc.net_connections(kind="inet"):
                if conn.raddr:
                    found.append(Socket(conn.raddr.ip, conn.raddr.port, proc.pid, name))
        except psutil.NoSuchProcess:
            continue
    return found
