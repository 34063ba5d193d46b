"""The Denoiser replica's GPU queue: one unit runs at a time; waiting units are served shortest remaining job first.

A replica accepts many units at once (``max_ongoing_requests`` 64, so Serve's router never has to wait for it), and
they wait here. First come, first served lets one job's step queue (24 windows: 24 units on one replica) delay
every other job's step by all of it; round-robin across jobs gives a short job an equal turn, not priority, so
beside a long job it still takes about twice its time alone. The default order serves the waiting unit whose job
has the least work left (``UnitKey.remaining``: guidance rows, this step's included) — shortest remaining
processing time, which minimises the mean completion time — with two additions:

* **ageing**: a unit's priority is its job's remaining work times ``1 - waited / ageing_s`` (never below 0), so a
  unit that has waited ``ageing_s`` goes before any newcomer: a long job is delayed, never starved;
* **anticipation**: a job's next unit comes only after its whole step returned to the Orchestrator. When the unit
  that just ran belongs to the job that goes first and the job sends another step (``UnitKey.continues``), the
  replica keeps itself for that job for up to ``anticipation`` times the unit's run time instead of starting a
  longer job's unit, which would make the short job's next unit wait for all of it. A unit that goes before the
  awaited job ends the wait at once; so does the awaited job's unit when it arrives.

Within one request, units run in arrival order. ``order="round_robin"`` (turns in rotation across requests) and
``"fifo"`` (first come, first served) are kept for comparison (``bench/bench_fanout.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal

UnitOrder = Literal["shortest_remaining", "round_robin", "fifo"]


@dataclass
class _Waiter:
    future: asyncio.Future
    remaining: int
    continues: bool
    arrived: float
    seq: int


@dataclass
class _Reservation:
    """The replica waits for ``key``'s next unit (whose priority would be ``remaining``) until ``timer`` fires."""

    key: str
    remaining: int
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class UnitQueue:
    """An asyncio lock whose waiters are granted by ``order`` (FIFO within a key). ``clock`` is for tests."""

    def __init__(self, order: UnitOrder = "shortest_remaining", ageing_s: float = 60.0, anticipation: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        if ageing_s <= 0 or anticipation < 0:
            raise ValueError(f"ageing_s must be positive and anticipation not negative, got {ageing_s}, "
                             f"{anticipation}")
        self.order, self.ageing_s, self.anticipation, self.clock = order, ageing_s, anticipation, clock
        self._waiting: OrderedDict[str, deque[_Waiter]] = OrderedDict()
        self._held = False
        self._holder = ""  # key of the unit holding the gate
        self._holder_since = 0.0
        self._holder_unit: tuple[int, bool] = (0, False)  # (remaining, continues) of the unit holding the gate
        self._reserved: _Reservation | None = None
        self._seq = itertools.count()
        self.anticipated = 0  # waits for a job's next unit that it then used (stats)

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._waiting.values())

    @property
    def held(self) -> bool:
        return self._held

    @property
    def reserved_for(self) -> str | None:
        return self._reserved.key if self._reserved is not None else None

    @contextlib.asynccontextmanager
    async def hold(self, key: str, remaining: int = 0, continues: bool = False) -> AsyncIterator[None]:
        key = "" if self.order == "fifo" else key
        await self._acquire(key, remaining, continues)
        self._holder, self._holder_since, self._holder_unit = key, self.clock(), (remaining, continues)
        try:
            yield
        finally:
            self._release()

    # -- priorities ----------------------------------------------------------------------------------------------
    def _priority(self, waiter: _Waiter, now: float) -> tuple[float, int]:
        aged = max(0.0, 1.0 - (now - waiter.arrived) / self.ageing_s)
        return waiter.remaining * aged, waiter.seq

    def _next_key(self) -> str | None:
        """The key whose head unit goes next."""
        if not self._waiting:
            return None
        if self.order != "shortest_remaining":
            return next(iter(self._waiting))  # rotation order (fifo: the one key)
        now = self.clock()
        return min(self._waiting, key=lambda k: self._priority(self._waiting[k][0], now))

    # -- acquire and release -------------------------------------------------------------------------------------
    async def _acquire(self, key: str, remaining: int, continues: bool) -> None:
        reserved = self._reserved
        if not self._held and reserved is not None and (key == reserved.key or remaining < reserved.remaining):
            self.anticipated += key == reserved.key  # the awaited unit, or one that goes before it anyway
            self._end_reservation()
            self._held = True
            return
        if not self._held and reserved is None and not self._waiting:
            self._held = True
            return
        waiter = _Waiter(asyncio.get_running_loop().create_future(), remaining, continues, self.clock(),
                         next(self._seq))
        self._waiting.setdefault(key, deque()).append(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._held = False  # granted just as the waiter was cancelled: hand it on
                self._grant_next()
            else:
                self._forget(key, waiter)
            raise

    def _forget(self, key: str, waiter: _Waiter) -> None:
        queue = self._waiting.get(key)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(waiter)
        if not queue:
            del self._waiting[key]

    def _release(self) -> None:
        """The holder is done: wait for its job's next unit if that job goes first and sends one, else hand the
        gate to the next waiter (that key then goes to the back of the rotation)."""
        self._held = False
        key, (remaining, continues) = self._holder, self._holder_unit
        if self.order == "round_robin" and key in self._waiting:
            self._waiting.move_to_end(key)  # the key that just ran waits for the others' turns
        if self._should_anticipate(key, remaining, continues):
            ran = self.clock() - self._holder_since
            self._reserved = _Reservation(key, remaining)
            self._reserved.timer = asyncio.get_running_loop().call_later(self.anticipation * ran, self._expire)
            return
        self._grant_next()

    def _should_anticipate(self, key: str, remaining: int, continues: bool) -> bool:
        if self.order != "shortest_remaining" or not continues or self.anticipation == 0 or key in self._waiting:
            return False
        best = self._next_key()
        if best is None:
            return True  # keep the idle replica for the job rather than for whoever arrives next
        now = self.clock()
        return (remaining, -1) < self._priority(self._waiting[best][0], now)

    def _expire(self) -> None:
        if self._reserved is not None:
            self._reserved = None
            if not self._held:
                self._grant_next()

    def _end_reservation(self) -> None:
        reserved, self._reserved = self._reserved, None
        if reserved is not None and reserved.timer is not None:
            reserved.timer.cancel()

    def _grant_next(self) -> None:
        while (key := self._next_key()) is not None:
            queue = self._waiting[key]
            waiter = queue.popleft()
            if queue and self.order == "round_robin":
                self._waiting.move_to_end(key)
            elif not queue:
                del self._waiting[key]
            if not waiter.future.done():
                self._held = True
                waiter.future.set_result(None)
                return
