"""A fair share of a replica's engine for each key: weighted by nothing, max-min by count.

vLLM schedules first come, first served, and runs every request it holds in one batch: a key
that sends 32 requests at once fills the batch, and every other key's request then decodes at
the pace of a 33-sequence batch, or waits behind the flood once the engine is full. The queue in
front of the engine lets at most ``slots`` requests run at once. A key with nothing running
always starts at once (so a quiet key never waits behind a busy one); beyond that, when a
request ends, the waiting key with the fewest running requests goes next (ties: the one waiting
longest). A busy key alone still gets every slot.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict, deque


class FairQueue:
    def __init__(self, slots: int | None) -> None:
        self.slots = slots  # None: no queue, every request runs at once
        self._running: dict[str, int] = defaultdict(int)
        self._total = 0
        self._waiting: dict[str, deque[tuple[int, asyncio.Future[None]]]] = defaultdict(deque)
        self._order = itertools.count()

    @property
    def total(self) -> int:
        return self._total

    def running(self, key: str) -> int:
        return self._running.get(key, 0)

    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def _grant(self, key: str) -> None:
        self._running[key] += 1
        self._total += 1

    async def acquire(self, key: str) -> None:
        """Return once the request may run; cancelled while waiting, it leaves the queue."""
        if self.slots is None or self._total < self.slots or not self._running.get(key):
            self._grant(key)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (next(self._order), future)
        self._waiting[key].append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(key)  # granted just as the client left
            else:
                try:
                    self._waiting[key].remove(entry)
                except ValueError:
                    pass
            raise

    def release(self, key: str) -> None:
        self._running[key] -= 1
        self._total -= 1
        if not self._running[key]:
            del self._running[key]
        self._dispatch()

    def _dispatch(self) -> None:
        while self.slots is not None and self._total < self.slots:
            queues = {k: q for k, q in self._waiting.items() if q}
            if not queues:
                return
            key = min(queues, key=lambda k: (self._running.get(k, 0), queues[k][0][0]))
            _, future = queues[key].popleft()
            if not queues[key]:
                del self._waiting[key]
            if future.cancelled():
                continue
            self._grant(key)
            future.set_result(None)
