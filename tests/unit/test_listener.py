"""The replica's own HTTP listener: replicas share one port (SO_REUSEPORT), a clash names the
fix, and stopping drains the responses in flight while new connections go elsewhere."""

from __future__ import annotations

import asyncio

import httpx
import psutil
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from serve_app.listener import ReplicaListener, reuseport_socket
from tests.conftest import free_port, wait_until


def app(tag: str, release: asyncio.Event | None = None) -> Starlette:
    async def who(request):
        return PlainTextResponse(tag)

    async def slow(request):
        """A stream held open after its first line until ``release`` is set."""
        async def body():
            yield "0\n"
            await release.wait()
            for i in range(1, 10):
                yield f"{i}\n"
        return StreamingResponse(body())

    return Starlette(routes=[Route("/", who), Route("/slow", slow)])


async def _get_tags(url: str, n: int) -> set[str]:
    tags = set()
    for _ in range(n):
        async with httpx.AsyncClient() as client:  # a new connection each time
            tags.add((await client.get(url)).text)
    return tags


def test_two_replicas_share_the_port_and_both_answer():
    async def main():
        port = free_port()
        a = ReplicaListener(app("a"), "127.0.0.1", port, drain_s=5)
        b = ReplicaListener(app("b"), "127.0.0.1", port, drain_s=5)
        await a.start()
        await b.start()
        try:
            assert a.alive and b.alive
            return await _get_tags(f"http://127.0.0.1:{port}/", 40)
        finally:
            await a.stop()
            await b.stop()

    assert asyncio.run(main()) == {"a", "b"}


def test_a_port_held_without_reuseport_names_the_fix():
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        with pytest.raises(RuntimeError, match="SERVE_APP_REPLICA_HTTP=false"):
            reuseport_socket("127.0.0.1", port)
    finally:
        holder.close()


def listening(port: int) -> int:
    """Sockets of this machine listening on ``port``."""
    return sum(1 for c in psutil.net_connections(kind="tcp")
               if c.status == psutil.CONN_LISTEN and c.laddr.port == port)


def test_stop_finishes_streams_in_flight_and_the_sibling_takes_new_connections():
    async def main():
        port = free_port()
        release = asyncio.Event()
        leaving = ReplicaListener(app("leaving", release), "127.0.0.1", port, drain_s=60)
        await leaving.start()
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(timeout=60) as client:
            async with client.stream("GET", f"{url}/slow") as resp:
                body = resp.aiter_lines()
                lines = [await body.__anext__()]
                staying = ReplicaListener(app("staying"), "127.0.0.1", port, drain_s=60)
                await staying.start()
                stopping = asyncio.create_task(leaving.stop())
                await wait_until(lambda: listening(port) == 1, timeout=30,
                                 what="the leaving listener to stop accepting")
                tags = await _get_tags(f"{url}/", 10)
                assert not stopping.done()  # still draining the stream it holds open
                release.set()
                lines += [line async for line in body]
        await stopping
        assert not leaving.alive and staying.alive
        await staying.stop()
        return lines, tags

    lines, tags = asyncio.run(main())
    assert lines == [str(i) for i in range(10)]
    assert tags == {"staying"}


def test_lifespan_runs_once_under_two_servers():
    """A colocated replica may run the app under its listener and Serve's direct ingress."""
    from serve_app.config import AppConfig, ModelConfig
    from serve_app.deployments import LocalHandle
    from serve_app.ingress import IngressApp
    from tests.fakes import FakeLLMServer

    async def main():
        ingress = IngressApp(AppConfig(models=(ModelConfig(name="m", device="cpu"),)),
                             {"m": LocalHandle(FakeLLMServer("m"))})
        starlette = ingress.build()
        async with starlette.router.lifespan_context(starlette):
            first = list(ingress._tasks)
            async with starlette.router.lifespan_context(starlette):
                assert ingress._tasks == first and ingress._lifespans == 2
            assert not any(t.cancelled() for t in first)
        await asyncio.sleep(0)
        assert all(t.cancelled() or t.done() for t in first)

    asyncio.run(main())
