"""The Denoiser replica's GPU queue: one unit runs at a time; waiting units are served round-robin across requests.

A replica accepts many units at once (``max_ongoing_requests`` 64, so Serve's router never has to wait for it), and
they wait here. First come, first served would let one job's step queue (24 windows: 24 units on one replica)
delay every other job's step by all of it. Round-robin across request ids gives each job with waiting units the
next turn in rotation: a short job's unit waits for at most one unit of each other job, so concurrent jobs share
the replicas fairly. Within one request, units run in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from typing import Literal

UnitOrder = Literal["round_robin", "fifo"]


class RoundRobinGate:
    """An asyncio lock whose waiters are granted round-robin across keys (FIFO within a key).

    ``order="fifo"`` puts every waiter under one key: plain first come, first served (kept for comparison in
    ``bench/bench_fanout.py``).
    """

    def __init__(self, order: UnitOrder = "round_robin"):
        self.order = order
        self._waiting: OrderedDict[str, deque[asyncio.Future]] = OrderedDict()
        self._held = False
        self._holder = ""  # key of the unit holding the gate: it goes to the back of the rotation on release

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._waiting.values())

    @property
    def held(self) -> bool:
        return self._held

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        key = key if self.order == "round_robin" else ""
        await self._acquire(key)
        self._holder = key
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, key: str) -> None:
        if not self._held and not self._waiting:
            self._held = True
            return
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, deque()).append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # granted just as the waiter was cancelled: hand it on
            else:
                self._forget(key, future)
            raise

    def _forget(self, key: str, future: asyncio.Future) -> None:
        queue = self._waiting.get(key)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(future)
        if not queue:
            del self._waiting[key]

    def _release(self) -> None:
        """Hand the gate to the head of the next key in rotation (that key then goes to the back)."""
        if self._holder in self._waiting:
            self._waiting.move_to_end(self._holder)  # the key that just ran waits for the others' turns
        while self._waiting:
            key, queue = next(iter(self._waiting.items()))
            future = queue.popleft()
            if queue:
                self._waiting.move_to_end(key)
            else:
                del self._waiting[key]
            if not future.done():
                future.set_result(None)
                return
        self._held = False
