"""Whether a replica's memory grew with the jobs it ran: the soak's leak check, kept apart so that a unit test can
show it catches the smallest leak it claims to (``tests/test_replica_memory.py``).

A replica's RSS, sampled every second or so, is a floor (what it keeps) plus transient buffers of the jobs in
flight at that instant (tens of MiB in the Pre/Postprocessor: decoded frames, VAE activations). Comparing two single
samples compares two transients; the floor does not move with them. So the check takes, after a warm-up, the lowest
sample among the replica's first ``window_jobs`` jobs and among its last ``window_jobs`` jobs, and bounds how far the
second rose above the first. A leak of ``LEAK_PER_JOB`` bytes per job raises the floor by at least that much per
job between the two windows; the bound is ``FLOOR_SLACK``, so a replica is judged only once that many jobs make such
a leak exceed the slack by a quarter (:func:`min_judged_jobs`): its bound per job is then at most 80 % of the leak
it must catch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

LEAK_PER_JOB = 100 * 1024  # the smallest leak per job the soak must catch
# How far a healthy replica's RSS floor may move after its warm-up: allocator and interpreter noise (freed arenas
# kept, a lazily grown dict), not a trend.
FLOOR_SLACK = 4 * 2**20
WARMUP_JOBS = 10  # a replica's first jobs load models and warm allocators and caches: not judged
WINDOW_JOBS = 10  # the floor at either end is the lowest sample over this many of the replica's jobs


def min_judged_jobs(slack: int = FLOOR_SLACK, leak_per_job: int = LEAK_PER_JOB) -> int:
    """The fewest jobs (after warm-up) over which a leak of ``leak_per_job`` exceeds ``slack`` by a quarter."""
    return math.ceil(1.25 * slack / leak_per_job)


@dataclass(frozen=True)
class FloorGrowth:
    """One replica's memory over the jobs it ran after its warm-up."""

    jobs: int  # jobs it ran between its two windows: what a leak per job raises the floor over
    first_floor: int  # bytes: the lowest sample over its first WINDOW_JOBS jobs after warm-up
    last_floor: int  # ... and over its last WINDOW_JOBS jobs
    slack: int = FLOOR_SLACK

    @property
    def growth(self) -> int:
        return self.last_floor - self.first_floor

    @property
    def judged(self) -> bool:
        """Ran enough jobs that a leak of LEAK_PER_JOB would exceed the bound."""
        return self.jobs >= min_judged_jobs(self.slack)

    @property
    def bound_per_job(self) -> float:
        return self.slack / self.jobs if self.jobs else math.inf

    @property
    def leaked(self) -> bool:
        return self.judged and self.growth > self.slack

    def describe(self) -> str:
        return (f"{self.jobs} jobs: floor {self.first_floor / 2**20:.1f} -> {self.last_floor / 2**20:.1f} MiB "
                f"({self.growth / 2**20:+.1f}; bound {self.slack / 2**20:.0f} MiB = "
                f"{self.bound_per_job / 1024:.0f} KiB/job{'' if self.judged else ', too few jobs to judge'})")


def floor_growth(samples: Sequence[tuple[int, int]], warmup_jobs: int = WARMUP_JOBS,
                 window_jobs: int = WINDOW_JOBS, slack: int = FLOOR_SLACK) -> FloorGrowth | None:
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
    return FloorGrowth(last - first - window_jobs, head, tail, slack)
