"""HTTP served by an engine replica itself, on a port its sibling replicas share.

Each colocated replica runs uvicorn on its own event loop, on a socket bound with
``SO_REUSEPORT``: every replica of a node binds the same host:port and the kernel spreads new
connections over them, so a token goes engine -> this process's uvicorn -> client, the path of
`vllm serve`, with no proxy in between. Ray Serve's HTTP proxy (and HAProxy) are then not
started at all, which saves their CPU per token and their memory (docs/performance.md). On a
cluster, Serve's HAProxy on the head is the front door and hands each connection to these
servers (deploy/on-prem.md, deploy/gcp.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn
from starlette.types import ASGIApp

from serve_app.ray_internals import keep_serve_grpc_on_loopback

logger = logging.getLogger("ray.serve")


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket that sibling replicas can bind too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(
            f"a replica cannot listen on {host}:{port}: {exc}. Another server holds the port "
            "without SO_REUSEPORT (Serve's own HTTP proxy, if it was started on the same "
            "port?): choose another SERVE_APP_PORT, or set SERVE_APP_REPLICA_HTTP=false to "
            "leave HTTP to Serve's proxy."
        ) from exc
    return sock


def loopback_socket() -> socket.socket:
    """A bound socket on a free loopback port: a replica's private address, where sibling
    replicas of its node relay the sessions it owns (``sessions.py``)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class ReplicaListener:
    """uvicorn on the running loop; ``stop`` drains in-flight responses like `vllm serve`.

    Not Serve's own ``start_asgi_http_server`` (private, and it turns the app's lifespan off:
    the app's readiness watcher and license gate start there)."""

    def __init__(self, app: ASGIApp, host: str, port: int, drain_s: float,
                 private: socket.socket | None = None) -> None:
        self.host, self.port = host, port
        # This replica's only socket beyond the port it serves (and its private loopback one).
        keep_serve_grpc_on_loopback()
        self._sockets = [reuseport_socket(host, port)] + ([private] if private else [])
        config = uvicorn.Config(
            app, lifespan="on", access_log=False, log_level="warning", log_config=None,
            timeout_graceful_shutdown=drain_s,
        )
        self._server = uvicorn.Server(config)
        # Serve runs user code off the main thread; uvicorn only traps signals on the main
        # one, but the replica's signals are Ray's to handle either way.
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=self._sockets))
        while not self._server.started:
            if self._task.done():  # the lifespan failed, or the socket did
                self._task.result()
                raise RuntimeError("the replica's HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        logger.info("Serving HTTP on %s:%d (SO_REUSEPORT)", self.host, self.port)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Stop accepting (the kernel sends new connections to the sibling replicas), let the
        responses in flight finish within ``drain_s``, then run the app's shutdown."""
        if self._task is None or self._task.done():
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await self._task
