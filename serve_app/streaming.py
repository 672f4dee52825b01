"""Streaming with fewer, larger messages: paced reads from vLLM, coalesced Ray hops.

``PacedEngine`` lets vLLM merge a stream's tokens between reads, which cuts the per-token work of
its OpenAI layer, the HTTP server and the client.

Across the router layout's Ray hop, every item a replica yields costs an object, a serialization
and an RPC on the way to the ingress. ``coalesce`` runs the source in its own task and hands the
consumer everything that arrived since its last read, joined: while the consumer keeps up, each
token still travels alone (TTFT unchanged); when it falls behind (many concurrent streams on few
cores), tokens ride together instead of queueing one message each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from serve_app import vllm_internals

logger = logging.getLogger("ray.serve")


async def coalesce(source: AsyncIterator[str]) -> AsyncIterator[str]:
    """Yield the concatenation of all items ``source`` produced since the previous yield.

    Cancelling the consumer cancels the source, so a disconnected client aborts its request.
    An exception in the source is raised to the consumer after what came before it.
    """
    pending: list[str] = []
    ready = asyncio.Event()
    finished = False
    failure: BaseException | None = None

    async def pump() -> None:
        nonlocal finished, failure
        try:
            async for item in source:
                pending.append(item)
                ready.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer below
            failure = exc
        finally:
            finished = True
            ready.set()

    task = asyncio.create_task(pump())
    try:
        while True:
            await ready.wait()
            ready.clear()
            if pending:
                chunk = "".join(pending)
                pending.clear()
                yield chunk
            if finished and not pending:
                break
        if failure is not None:
            raise failure
    finally:
        if not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass


class PacedEngine:
    """vLLM's engine client as its OpenAI layer sees it, pacing what each stream hands on.

    vLLM produces one output per token per request, and its OpenAI layer turns each into an SSE
    event (a pydantic chunk and its JSON) that the server writes and the client parses. With a
    small model or many streams that per-token work competes with the engine for the CPU. vLLM
    already merges the outputs a slow reader has not picked up (its ``RequestOutputCollector``);
    pacing the reads puts that to use. A stream's first output goes on at once (TTFT unchanged),
    each next one no sooner than ``interval_s`` after the one before, and the final one (or an
    error) as soon as vLLM has it, so a stream never ends later than unpaced. A model slower than
    the interval per token streams exactly as before. Non-streaming requests pass through.
    vLLM's own ``stream_interval`` counts tokens instead, which holds every token of a slow model
    for several token times; a bound in time does not.

    At 20 ms it raises system tokens/s at high concurrency and leaves concurrency 1 and TTFT
    unchanged (docs/performance.md). Ray Serve's LLM app batches streams the same way at 50 ms,
    but holds the first token too.
    """

    def __init__(self, engine: Any, interval_s: float) -> None:
        self._engine = engine
        self._interval = interval_s
        self._delta = vllm_internals.delta_kind()  # streams; whole answers come as FINAL_ONLY

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str, *args: Any,
                       **kwargs: Any) -> AsyncIterator[Any]:
        outputs = self._engine.generate(prompt, sampling_params, request_id, *args, **kwargs)
        paced = getattr(sampling_params, "output_kind", None) == self._delta
        loop = asyncio.get_running_loop()
        final: _FinalOutput | None = None
        try:
            async for output in outputs:
                sent = loop.time()
                yield output
                if not paced or output.finished:
                    continue
                if final is None:
                    final = _FinalOutput.watch(self._engine, request_id)
                await final.wait(sent + self._interval - loop.time())
        finally:
            await outputs.aclose()


class _FinalOutput:
    """Wakes a held stream when its final output or an error reaches vLLM's collector.

    Finds the collector through the output processor's request-id index (a vLLM internal, see
    ``vllm_internals``). Without it, a held stream simply waits out the interval: its end may
    come up to one interval later, and nothing else changes.
    """

    warned = False  # one warning per process, not one per stream

    def __init__(self, collector: Any) -> None:
        self._collector = collector
        self._waiter: asyncio.Future[None] | None = None
        if collector is not None:
            vllm_internals.on_put(collector, self._wake_on_last)

    def _wake_on_last(self, output: Any) -> None:
        if self._waiter is not None and not self._waiter.done() and _is_last(output):
            self._waiter.set_result(None)

    @classmethod
    def watch(cls, engine: Any, request_id: str) -> _FinalOutput:
        collector = vllm_internals.output_collector(engine, request_id)
        if collector is None and not _FinalOutput.warned:
            _FinalOutput.warned = True
            logger.warning("vLLM's output collector was not found (a vLLM upgrade?): paced "
                           "streams end up to one interval later")
        return cls(collector)

    async def wait(self, delay: float) -> None:
        if delay <= 0:
            return
        if self._collector is None:
            await asyncio.sleep(delay)
            return
        if _is_last(vllm_internals.collected(self._collector)):
            return  # arrived while the consumer was busy
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = loop.call_later(delay, lambda: waiter.done() or waiter.set_result(None))
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None


def _is_last(output: Any) -> bool:
    if output is None:
        return False
    # RequestOutput has `finished`; exceptions and vLLM's end-of-input marker do not.
    return bool(getattr(output, "finished", True))
