"""Whether a replica's memory grew with the jobs it ran: the soak's leak check, kept apart so that a unit test can
show it catches the smallest leak it claims to (``tests/test_replica_memory.py``).

A replica's RSS, sampled every second or so, is a floor (what it keeps) plus transient buffers of the jobs in
flight at that instant (tens of MiB in the Pre/Postprocessor: decoded frames, VAE activations). Comparing two single
samples compares two transients; the floor does not move with them. So the check takes, after a warm-up, the lowest
sample among the replica's first ``window_jobs`` jobs and among its last ``window_jobs`` jobs, and bounds how far the
second rose above the first by ``BOUND_PER_JOB`` times the jobs the replica ran between the two windows: 80 % of the
leak it catches (``LEAK_PER_JOB``), so such a leak breaks the bound by itself, whatever else moves.

Why not tighter: a healthy replica's floor still creeps over the few dozen jobs a replica of the soak lives between
its warm-up and the next restart (allocator high-water, warm-up that goes on). Measured in two soaks on a loaded
2-core box, after a 10-job warm-up: up to 134 KiB per job over 40-55 jobs (Preprocessor, Denoisers), 39-60 over
70; over longer runs it falls to a few KiB per job (docs/benchmarks.md, 150 -> 300 jobs). A bound that a leak of
100 KiB per job breaks needs replicas that live 150 jobs or more past their warm-up, which this soak's length and
restarts do not give. A replica is judged once it ran ``MIN_JUDGED_JOBS`` between its windows: there the 50 KiB per
job between the bound and the leak add up to 2 MB, more than the floor of a flat series moves by noise alone.

A leak raises the floor job after job; a healthy Pre/Postprocessor's floor also moves in one-off steps of 7-13 MiB
either way (measured in the soak: one Preprocessor +12.7 MiB over 45 jobs while its twin fell 7 MiB; allocator
arenas taken into use are a likely cause, not pinned down), as much as the leak adds over the whole span. So a replica has leaked only when
its floor rose past the bound *and* rose on both sides of every split of the span's middle third, by at least
``SIDE_RATE_PER_JOB`` per job on each (the floor at a split: the lowest sample from that job on): a leak raises
every stretch, a step only the side it falls on, so some split (just before it, or any when it falls outside the
middle third) leaves the other side flat. A step on top of a leak only raises one side more
(``tests/test_replica_memory.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

LEAK_PER_JOB = 250 * 1024  # the smallest leak per job the soak catches
BOUND_PER_JOB = 200 * 1024  # how much a replica's RSS floor may rise per job it ran
WARMUP_JOBS = 10  # a replica's first jobs load models and warm allocators and caches: not judged
WINDOW_JOBS = 10  # the floor at either end is the lowest sample over this many of the replica's jobs
MIN_JUDGED_JOBS = 40  # jobs between the two windows for a replica to be judged
SIDE_RATE_PER_JOB = BOUND_PER_JOB // 2  # the least rise per job on each side of every split, for a leak


@dataclass(frozen=True)
class FloorGrowth:
    """One replica's memory over the jobs it ran after its warm-up."""

    jobs: int  # jobs it ran between its two windows: what a leak per job raises the floor over
    first_floor: int  # bytes: the lowest sample over its first WINDOW_JOBS jobs after warm-up
    last_floor: int  # ... and over its last WINDOW_JOBS jobs
    flattest_side: float  # bytes per job: the least rise, over the splits, of either side of the split

    @property
    def growth(self) -> int:
        return self.last_floor - self.first_floor

    @property
    def bound(self) -> int:
        return BOUND_PER_JOB * self.jobs

    @property
    def judged(self) -> bool:
        return self.jobs >= MIN_JUDGED_JOBS

    @property
    def leaked(self) -> bool:
        return self.judged and self.growth > self.bound and self.flattest_side > SIDE_RATE_PER_JOB

    def describe(self) -> str:
        per_job = self.growth / self.jobs / 1024 if self.jobs else math.nan
        return (f"{self.jobs} jobs: floor {self.first_floor / 2**20:.1f} -> {self.last_floor / 2**20:.1f} MiB "
                f"({self.growth / 2**20:+.1f}, {per_job:+.0f} KiB/job, the flattest side of a split "
                f"{self.flattest_side / 1024:+.0f} KiB/job; bound {self.bound / 2**20:.1f} MiB"
                f"{'' if self.judged else ', too few jobs to judge'})")


def floor_growth(samples: Sequence[tuple[int, int]], warmup_jobs: int = WARMUP_JOBS,
                 window_jobs: int = WINDOW_JOBS) -> FloorGrowth | None:
    """``samples``: (jobs the replica had run, RSS bytes), in time order. None when, after the warm-up, it did not
    run jobs enough for two windows that do not overlap."""
    if not samples:
        return None
    warm = [(jobs, rss) for jobs, rss in samples if jobs >= samples[0][0] + warmup_jobs]
    if not warm or warm[-1][0] - warm[0][0] < 2 * window_jobs:
        return None
    first, last = warm[0][0], warm[-1][0]
    head = min(rss for jobs, rss in warm if jobs < first + window_jobs)
    tail = min(rss for jobs, rss in warm if jobs > last - window_jobs)
    return FloorGrowth(last - first - window_jobs, head, tail,
                       _flattest_side(warm, (first, head), (last - window_jobs + 1, tail)))


def _flattest_side(warm: Sequence[tuple[int, int]], head: tuple[int, int], tail: tuple[int, int]) -> float:
    """The least rise per job, over the splits of the middle third between ``head`` and ``tail`` (job, floor: the
    lowest of a window, first reached at about its first job), of either side of the split: from ``head`` to the
    floor at the split (the lowest sample from it on), and from there to ``tail``."""
    (start, head_floor), (end, tail_floor) = head, tail
    floor_from, lowest = {}, None
    for jobs, rss in reversed(warm):
        lowest = rss if lowest is None else min(lowest, rss)
        floor_from[jobs] = lowest
    third = (end - start) / 3
    splits = [j for j in floor_from if start + third <= j <= end - third]
    # no sampled job in the middle third (jobs ended faster than the samples): no split to tell a step by
    return min((min((floor_from[j] - head_floor) / (j - start), (tail_floor - floor_from[j]) / (end - j))
                for j in splits), default=math.inf)
