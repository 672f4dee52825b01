"""How the license server listens: uvicorn, with the deadline uvicorn leaves out, and one or two
listeners (the client API, and the admin API on its own address) in one process.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but sets no deadline on a
request being received: a client that sends half a request head, or a body one byte at a
time, and never finishes (slowloris) holds its connection, and a place under
``limit_concurrency``, for ever. ``deadline_protocol`` closes a connection whose request head is
not whole ``header_timeout_s`` after the connection opened or the previous answer went out, or
whose body is not whole ``body_timeout_s`` after its head. (The routes answer a body they are
reading too slowly with 408 sooner, ``wire.read_model``; this deadline also covers a body the
server never reads, e.g. after a 401.)

It relies on uvicorn's h11 protocol, ``uvicorn.protocols.http.h11_impl.H11Protocol``: its
``connection_made``, ``data_received``, ``on_response_complete``, ``connection_lost``,
``loop``, ``transport``, and its h11 connection ``conn``, whose ``their_state`` is ``IDLE``
until a request head is whole and ``SEND_BODY`` until its body is.
``tests/adversarial/test_server_network.py`` sends half a head and half a body to a real server
and waits for the close: an upstream change breaks that test, not silently the deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


def deadline_protocol(header_timeout_s: float, body_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, closing connections whose request is not received in time."""

    class DeadlineProtocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _phase: object = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def connection_lost(self, exc: Exception | None) -> None:
            self._set_timer(None, 0.0)
            super().connection_lost(exc)

        def _watch(self) -> None:
            """(Re)start the deadline of the phase the request is in, when it changed."""
            state = self.conn.their_state
            if state is h11.IDLE:
                self._set_timer(h11.IDLE, header_timeout_s)
            elif state is h11.SEND_BODY:
                self._set_timer(h11.SEND_BODY, body_timeout_s)
            else:  # the request is in (or the connection is ending): the app has it
                self._set_timer(None, 0.0)

        def _set_timer(self, phase: object, seconds: float) -> None:
            if phase is self._phase and phase is not None:
                return
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._phase = phase
            if phase is not None:
                self._timer = self.loop.call_later(seconds, self._late, phase)

        def _late(self, phase: object) -> None:
            self._timer = None
            if self._phase is phase and not self.transport.is_closing():
                self.logger.info("closing a connection from %s: its request was not received "
                                 "in time", self.client[0] if self.client else "?")
                self.transport.close()

    return DeadlineProtocol


class Listener(uvicorn.Server):
    """One of the process's listeners: a signal that stops one stops them all."""

    def __init__(self, config: uvicorn.Config, group: list[Listener]) -> None:
        super().__init__(config)
        self._group = group
        group.append(self)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        for other in self._group:
            other.should_exit = True
            other.force_exit = other.force_exit or self.force_exit


def listeners(configs: Sequence[uvicorn.Config]) -> list[Listener]:
    group: list[Listener] = []
    for config in configs:
        Listener(config, group)
    return group


async def serve_all(servers: Sequence[uvicorn.Server]) -> None:
    """Run ``servers`` on this loop until they stop (a signal, or ``should_exit``)."""
    await asyncio.gather(*(s.serve() for s in servers))
