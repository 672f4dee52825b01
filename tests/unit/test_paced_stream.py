"""PacedEngine over vLLM's real output processor and collector (no model, no engine process):
tokens are fed the way the engine core's outputs arrive, and read the way AsyncLLM reads them.
The loop's clock is injected (``VirtualTimeLoop``): every output's time is exact."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import require_vllm

require_vllm()

from serve_app import vllm_internals  # noqa: E402
from serve_app.streaming import PacedEngine  # noqa: E402
from tests.fakes import run_in_virtual_time  # noqa: E402

(RequestOutputKind, SamplingParams, EngineCoreOutput, EngineCoreRequest, FinishReason,
 OutputProcessor, RequestOutputCollector) = map(vllm_internals.symbol, (
    "RequestOutputKind", "SamplingParams", "EngineCoreOutput", "EngineCoreRequest", "FinishReason",
    "OutputProcessor", "RequestOutputCollector"))

# Long enough that a stream which waited one out would fail the test's timeout.
FOREVER = 60.0


class Engine:
    """AsyncLLM's ``generate`` loop, request bookkeeping and output path, minus the engine core."""

    def __init__(self, index: bool = True) -> None:
        self.output_processor = OutputProcessor(None, log_stats=False)
        self._index = index
        self.internal = ""
        self.closed = False

    async def generate(self, prompt, params, request_id):
        self.internal = f"{request_id}-0"
        request = EngineCoreRequest(self.internal, [1, 2, 3], None, params, None, time.time(),
                                    None, None, None, external_req_id=request_id)
        queue = RequestOutputCollector(params.output_kind, self.internal)
        self.output_processor.add_request(request, None, None, 0, queue)
        if self._index:
            self.output_processor.external_req_ids[request_id].append(self.internal)
        try:
            finished = False
            while not finished:
                out = queue.get_nowait() or await queue.get()
                finished = out.finished
                yield out
        finally:
            self.closed = True

    def emit(self, token: int, last: bool = False) -> None:
        reason = FinishReason.LENGTH if last else None
        self.output_processor.process_outputs(
            [EngineCoreOutput(self.internal, [token], finish_reason=reason)])

    def fail(self, exc: Exception) -> None:
        self.output_processor.request_states[self.internal].queue.put(exc)


def params(kind=RequestOutputKind.DELTA):
    return SamplingParams(max_tokens=50, detokenize=False, output_kind=kind)


async def feed(engine: Engine, n: int, gap: float, last: bool = True) -> list[float]:
    """Emit ``n`` tokens ``gap`` apart; returns when each was emitted."""
    loop = asyncio.get_running_loop()
    emitted = []
    await asyncio.sleep(0.01)
    for i in range(n):
        engine.emit(100 + i, last=last and i == n - 1)
        emitted.append(loop.time())
        await asyncio.sleep(gap)
    return emitted


async def collect(engine: Engine, paced: PacedEngine, kind=RequestOutputKind.DELTA):
    """(token ids, finished, when the reader got it) for each output."""
    loop = asyncio.get_running_loop()
    outs = []
    async for out in paced.generate("prompt", params(kind), "req-1"):
        outs.append((list(out.outputs[0].token_ids), out.finished, loop.time()))
    return outs


def run(engine: Engine, interval: float, n: int, gap: float, kind=RequestOutputKind.DELTA):
    async def main():
        feeder = asyncio.create_task(feed(engine, n, gap))
        outs = await asyncio.wait_for(collect(engine, PacedEngine(engine, interval), kind), 20)
        return outs, await feeder

    return run_in_virtual_time(main())


def test_first_token_at_once_and_the_final_output_without_waiting_out_the_interval():
    outs, emitted = run(Engine(), FOREVER, n=10, gap=0.002)
    # The first token alone, then everything vLLM merged while the stream was held, ending the
    # moment the last token arrived instead of after the interval.
    assert [(ids, done) for ids, done, _ in outs] == [([100], False), (list(range(101, 110)), True)]
    assert outs[0][2] == emitted[0] and outs[-1][2] == emitted[-1]


def test_outputs_between_first_and_last_come_at_most_once_per_interval():
    outs, emitted = run(Engine(), 0.05, n=40, gap=0.005)  # 200 ms of tokens
    tokens = [t for ids, _, _ in outs for t in ids]
    assert tokens == list(range(100, 140))  # nothing lost, nothing reordered
    assert [done for _, done, _ in outs] == [False] * (len(outs) - 1) + [True]
    times = [t for _, _, t in outs]
    assert times[0] == emitted[0] and times[-1] == emitted[-1]
    assert all(b - a >= 0.05 - 1e-9 for a, b in zip(times[:-2], times[1:-1], strict=True))
    assert len(outs) == 5  # merged: at 0, 50, 100, 150 ms and the last token's moment


def test_non_streaming_requests_pass_through():
    outs, _ = run(Engine(), FOREVER, n=5, gap=0.001, kind=RequestOutputKind.FINAL_ONLY)
    assert [(ids, done) for ids, done, _ in outs] == [(list(range(100, 105)), True)]


def test_without_vllms_request_index_a_stream_still_carries_every_token():
    # The fallback if a vLLM release renames what _FinalOutput looks up: correct, a bit later.
    outs, _ = run(Engine(index=False), 0.1, n=5, gap=0.001)
    assert [t for ids, _, _ in outs for t in ids] == list(range(100, 105))
    assert outs[-1][1] is True


def test_an_error_wakes_a_held_stream():
    async def main():
        engine = Engine()
        paced = PacedEngine(engine, FOREVER)
        gen = paced.generate("prompt", params(), "req-1")
        feeder = asyncio.create_task(feed(engine, 2, 0.001, last=False))
        first = await gen.__anext__()
        await feeder
        asyncio.get_running_loop().call_later(0.02, engine.fail, RuntimeError("engine died"))
        with pytest.raises(RuntimeError, match="engine died"):
            await asyncio.wait_for(gen.__anext__(), 20)
        return first, engine.closed

    first, closed = run_in_virtual_time(main())
    assert list(first.outputs[0].token_ids) == [100]
    assert closed


def test_closing_a_held_stream_closes_vllms_generator():
    # How a client disconnect reaches vLLM: the serving layer closes the generator, and vLLM
    # aborts the request when its own generator closes.
    async def main():
        engine = Engine()
        gen = PacedEngine(engine, FOREVER).generate("prompt", params(), "req-1")
        feeder = asyncio.create_task(feed(engine, 3, 0.001, last=False))
        await gen.__anext__()
        task = asyncio.create_task(gen.__anext__())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await gen.aclose()
        await feeder
        return engine.closed

    assert run_in_virtual_time(main()) is True
