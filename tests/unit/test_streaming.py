"""``coalesce`` on a loop whose clock is injected (``VirtualTimeLoop``): how the source's and
the consumer's pace interleave is decided by the program, not by how busy the machine is."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.streaming import coalesce
from tests.fakes import run_in_virtual_time


async def _source(items, gaps, log):
    try:
        for item, gap in zip(items, gaps, strict=True):
            await asyncio.sleep(gap)
            yield item
    except asyncio.CancelledError:
        log.append("cancelled")
        raise
    finally:
        log.append("closed")


def test_fast_consumer_gets_each_item_alone():
    async def main():
        log = []
        out = [x async for x in coalesce(_source(["a", "b", "c"], [0.01] * 3, log))]
        return out, log

    out, log = run_in_virtual_time(main())
    assert out == ["a", "b", "c"]
    assert log == ["closed"]


def test_slow_consumer_gets_items_joined_in_order():
    async def main():
        out = []
        async for x in coalesce(_source(list("abcdefgh"), [0] * 8, [])):
            out.append(x)
            await asyncio.sleep(0.05)  # a busy consumer
        return out

    out = run_in_virtual_time(main())
    # The first read at once; all the source made while the consumer was busy, in one piece.
    assert out == ["a", "bcdefgh"]


def test_error_is_raised_after_the_items_before_it():
    async def bad():
        yield "a"
        yield "b"
        raise ValueError("boom")

    async def main():
        got = []
        with pytest.raises(ValueError, match="boom"):
            async for x in coalesce(bad()):
                got.append(x)
        return got

    assert "".join(run_in_virtual_time(main())) == "ab"


def test_cancelling_the_consumer_cancels_the_source():
    async def main():
        log = []
        gen = coalesce(_source(["a"] * 100, [0.01] * 100, log))

        async def consume():
            async for _ in gen:
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
        return log

    assert run_in_virtual_time(main()) == ["cancelled", "closed"]


def test_closing_early_cancels_the_source():
    async def main():
        log = []
        gen = coalesce(_source(["a"] * 100, [0.01] * 100, log))
        assert await gen.__anext__() == "a"
        await gen.aclose()
        return log

    assert run_in_virtual_time(main()) == ["cancelled", "closed"]
