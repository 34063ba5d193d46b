"""Which of an Orchestrator replica's jobs run their denoising now: long jobs cannot hold every slot.

A replica runs ``max_running_jobs`` jobs at once. Claimed first come, first served, two long jobs would fill both
slots and a short job would wait in the database until one of them finished, however little work it had. A job's
work is known only once it is prepared (its windows and steps), so the decision is taken here, after preprocessing:

* ``max_running_jobs`` slots take any job; ``short_job_slots`` more take only **short** jobs, whose work
  (guidance rows: windows x 3 x steps) is at most ``short_job_rows``; so a short job starts at once even when long
  jobs hold every regular slot, and its units then go first on the Denoisers (shortest remaining work,
  :mod:`deployments.workers.unit_queue`);
* a job that finds no slot waits here; a freed slot goes to the waiting job with the least work, aged like the
  Denoisers' units (``work x (1 - waited / ageing_s)``), so a long job is delayed, never starved;
* the runner claims a job from the database while it holds fewer than ``max_running_jobs + short_job_slots`` jobs
  beyond those waiting here (up to ``max_running_jobs`` waiting): a long job claimed into a short slot waits here
  instead of keeping the next short job in the database.

A job keeps its slot until its run ends (postprocessing included), as ``max_running_jobs`` always meant.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Waiting:
    work: int
    arrived: float
    seq: int
    future: asyncio.Future = field(repr=False)


class Ticket:
    """A job's slot; ``release`` (idempotent) hands it to the next waiting job."""

    def __init__(self, admission: DenoiseAdmission, short: bool):
        self.admission, self.short, self.released = admission, short, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission._release(self)


class DenoiseAdmission:
    def __init__(self, slots: int, short_slots: int, short_rows: int, ageing_s: float,
                 clock: Callable[[], float] = time.monotonic):
        if slots < 1 or short_slots < 0 or short_rows < 0 or ageing_s <= 0:
            raise ValueError(f"slots {slots} >= 1, short_slots {short_slots} >= 0, short_rows {short_rows} >= 0 "
                             f"and ageing_s {ageing_s} > 0 required")
        self.slots, self.short_slots, self.short_rows, self.ageing_s = slots, short_slots, short_rows, ageing_s
        self.clock = clock
        self.running = 0
        self.running_long = 0
        self._waiting: list[_Waiting] = []
        self._seq = itertools.count()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def is_short(self, work: int) -> bool:
        return work <= self.short_rows

    def may_claim(self, held: int) -> bool:
        """Whether a runner holding ``held`` jobs may claim another from the database."""
        return held < self.slots + self.short_slots + min(len(self._waiting), self.slots)

    def fits(self, work: int) -> bool:
        """Long jobs only in the regular slots; short ones in any (``long <= slots``, ``all <= slots + short``)."""
        if self.running >= self.slots + self.short_slots:
            return False
        return self.is_short(work) or self.running_long < self.slots

    def _take(self, work: int) -> Ticket:
        short = self.is_short(work)
        self.running += 1
        self.running_long += not short
        return Ticket(self, short)

    def _priority(self, waiting: _Waiting, now: float) -> tuple[float, int]:
        return waiting.work * max(0.0, 1.0 - (now - waiting.arrived) / self.ageing_s), waiting.seq

    async def admit(self, work: int) -> Ticket:
        """Wait for a slot for a job of ``work`` guidance rows (shorter waiting jobs first, aged)."""
        if self.fits(work):  # a waiting job never fits (each release grants those that do): none is passed over
            return self._take(work)
        entry = _Waiting(work, self.clock(), next(self._seq), asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            return await entry.future
        except asyncio.CancelledError:
            if entry.future.done() and not entry.future.cancelled():
                entry.future.result().release()  # granted as it was cancelled: hand the slot on
            elif entry in self._waiting:
                self._waiting.remove(entry)
            raise

    def _release(self, ticket: Ticket) -> None:
        self.running -= 1
        self.running_long -= not ticket.short
        self._grant()

    def _grant(self) -> None:
        """Give free slots to the waiting jobs that fit, best (aged) priority first."""
        now = self.clock()
        for entry in sorted(self._waiting, key=lambda e: self._priority(e, now)):
            if entry.future.done():
                self._waiting.remove(entry)
            elif self.fits(entry.work):
                self._waiting.remove(entry)
                entry.future.set_result(self._take(entry.work))
