"""Whether a replica's memory grew with the jobs it ran: the soak's leak check, kept apart so that a unit test can
show it catches the smallest leak it claims to (``tests/test_replica_memory.py``).

A replica's resident anonymous memory (:func:`anonymous_rss`), sampled every second or so, is a floor (what it
keeps) plus transient buffers of the jobs in flight at that instant (tens of MiB in the Pre/Postprocessor: decoded
frames, VAE activations). Comparing two single samples compares two transients; the floor does not move with them.
So the check takes, after a warm-up, the floor (:func:`low_floor`: the lowest sample but for the lowest tenth) over
the replica's first ``WINDOW_JOBS`` jobs and over its last ``WINDOW_JOBS`` jobs, and bounds how far the second rose
above the first by the check's bound per job times the jobs the replica ran between the two windows: 80 % of the
leak it catches, so such a leak breaks the bound by itself, whatever else moves (:class:`LeakCheck`).

Why not tighter: a healthy replica's floor still creeps over the few dozen jobs a replica of the soak lives between
its warm-up and the next restart (allocator high-water, warm-up that goes on). Measured in two soaks on a loaded
2-core box, after a 10-job warm-up: up to 134 KiB per job over 40-55 jobs (Preprocessor, Denoisers), 39-60 over
70; over longer runs it falls to a few KiB per job (docs/benchmarks.md, 150 -> 300 jobs). So the chaos soak
catches a leak of 250 KiB per job (:data:`SOAK`). A bound that a leak of 100 KiB per job breaks needs replicas that
live over a hundred jobs past their warm-up, which the soak's restarts do not give, and floors that do not wander
with what the allocator keeps for reuse: ``tests/test_long_lived_replicas.py`` (:data:`LONG_LIVED`). A replica is
judged once it ran the check's ``min_judged_jobs`` between its windows: there the margin between the bound and the
leak adds up to 2 MB or more, more than the floor of a flat series moves by noise alone.

A leak raises the floor job after job; a healthy Pre/Postprocessor's floor also moves in one-off steps of 7-13 MiB
either way (measured in the soak: one Preprocessor +12.7 MiB over 45 jobs while its twin fell 7 MiB; allocator
arenas taken into use are a likely cause, not pinned down), as much as the leak adds over the whole span, and
dips for a moment below it. So a replica has leaked only when its floor rose past the bound *and*, at the median of
the splits of the span's middle third, rose on both sides of the split by at least half the bound per job (the
floor at a split: that over the few jobs from it): a leak raises every stretch, a step only the
side it falls on, so at every split one side stays flat; a dip lowers the floor only at the splits whose window
holds it, too few to move the median. A step on top of a leak only raises one side more
(``tests/test_replica_memory.py``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

WINDOW_JOBS = 10  # the floor at either end is that of the samples over this many of the replica's jobs
SPLIT_WINDOW_JOBS = 5  # ... and at a split, over this many: a dip then moves few of the middle third's splits
FLOOR_QUANTILE = 0.1  # a window's floor: this quantile of its samples (:func:`low_floor`)


def low_floor(samples: Sequence[int]) -> int:
    """The floor of a window's samples: the lowest but for the lowest tenth. Transient buffers only raise samples;
    a replica also drops below its floor for a moment now and then (a Postprocessor by ~7 MiB on about one sample in
    a hundred), which the lowest sample alone would take for the floor."""
    return sorted(samples)[int(FLOOR_QUANTILE * (len(samples) - 1))]


def anonymous_rss(pid: int) -> int:
    """The process's resident anonymous memory (``RssAnon``, bytes): its heaps and buffers, where a leak grows. The
    whole RSS also counts pages of mapped files (libraries, models), which the kernel may drop and read back at any
    time, whatever the process keeps."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no RssAnon line in /proc/{pid}/status")


@dataclass(frozen=True)
class LeakCheck:
    """The smallest leak per job a check catches, the bound it puts on the floor's rise per job (at most 80 % of the
    leak: the leak breaks it even where the floor beneath it falls a little),
    the jobs a replica must run between its windows to be judged, and its first jobs, not judged: they load models
    and warm allocators and caches."""

    leak_per_job: int
    bound_per_job: int
    min_judged_jobs: int
    warmup_jobs: int

    @property
    def side_rate_per_job(self) -> int:
        """The least rise per job on each side of every split, for a leak."""
        return self.bound_per_job // 2


# The chaos soak's replicas live 40-70 jobs between the restarts it causes.
SOAK = LeakCheck(leak_per_job=250 * 1024, bound_per_job=200 * 1024, min_judged_jobs=40, warmup_jobs=10)
# Replicas that nothing restarts, with heaps that keep no freed buffers (tests/test_long_lived_replicas.py): their
# floors moved by -20 to +14 KiB per job over 110 jobs. A floor that falls lowers a leak on top of it as much, so the
# bound sits halfway to the leak: 50 KiB per job either way before a healthy floor fails or a leak passes.
LONG_LIVED = LeakCheck(leak_per_job=100 * 1024, bound_per_job=50 * 1024, min_judged_jobs=100, warmup_jobs=10)


@dataclass(frozen=True)
class FloorGrowth:
    """One replica's memory over the jobs it ran after its warm-up, judged by ``check``."""

    jobs: int  # jobs it ran between its two windows: what a leak per job raises the floor over
    first_floor: int  # bytes: the floor over its first WINDOW_JOBS jobs after the check's warm-up
    last_floor: int  # ... and over its last WINDOW_JOBS jobs
    lesser_side: float  # bytes per job: the median, over the splits, of the lesser rise of the split's two sides
    check: LeakCheck

    @property
    def growth(self) -> int:
        return self.last_floor - self.first_floor

    @property
    def bound(self) -> int:
        return self.check.bound_per_job * self.jobs

    @property
    def judged(self) -> bool:
        return self.jobs >= self.check.min_judged_jobs

    @property
    def leaked(self) -> bool:
        return self.judged and self.growth > self.bound and self.lesser_side > self.check.side_rate_per_job

    def describe(self) -> str:
        per_job = self.growth / self.jobs / 1024 if self.jobs else math.nan
        return (f"{self.jobs} jobs: floor {self.first_floor / 2**20:.1f} -> {self.last_floor / 2**20:.1f} MiB "
                f"({self.growth / 2**20:+.1f}, {per_job:+.0f} KiB/job, the lesser side of the median split "
                f"{self.lesser_side / 1024:+.0f} KiB/job; bound {self.bound / 2**20:.1f} MiB"
                f"{'' if self.judged else ', too few jobs to judge'})")


def floor_growth(samples: Sequence[tuple[int, int]], check: LeakCheck) -> FloorGrowth | None:
    """``samples``: (jobs the replica had run, RSS bytes), in time order. None when, after the warm-up, it did not
    run jobs enough for two windows that do not overlap."""
    if not samples:
        return None
    warm = [(jobs, rss) for jobs, rss in samples if jobs >= samples[0][0] + check.warmup_jobs]
    if not warm or warm[-1][0] - warm[0][0] < 2 * WINDOW_JOBS:
        return None
    first, last = warm[0][0], warm[-1][0]
    head = low_floor([rss for jobs, rss in warm if jobs < first + WINDOW_JOBS])
    tail = low_floor([rss for jobs, rss in warm if jobs > last - WINDOW_JOBS])
    return FloorGrowth(last - first - WINDOW_JOBS, head, tail,
                       _median_lesser_side(warm, (first, head), (last - WINDOW_JOBS + 1, tail)), check)


def _median_lesser_side(warm: Sequence[tuple[int, int]], head: tuple[int, int], tail: tuple[int, int]) -> float:
    """The median, over the splits of the middle third between ``head`` and ``tail`` (job, the floor of its window),
    of the lesser rise per job of the split's two sides: from ``head`` to the floor at the split (over the
    ``SPLIT_WINDOW_JOBS`` jobs from it), and from there to ``tail``. A leak raises both sides of every split; a
    one-off step leaves one side of every split flat; a dip (a moment the replica held less than usual) moves only
    the splits whose window holds it, which the median passes over."""
    (start, head_floor), (end, tail_floor) = head, tail
    third = (end - start) / 3
    splits = sorted({j for j, _ in warm if start + third <= j <= end - third})
    sides = []
    for split in splits:
        floor = low_floor([rss for jobs, rss in warm if split <= jobs < split + SPLIT_WINDOW_JOBS])
        sides.append(min((floor - head_floor) / (split - start), (tail_floor - floor) / (end - split)))
    # no sampled job in the middle third (jobs ended faster than the samples): no split to tell a step by
    return statistics.median(sides) if sides else math.inf
