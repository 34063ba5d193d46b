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


@dataclass(frozen=True)
class FloorGrowth:
    """One replica's memory over the jobs it ran after its warm-up."""

    jobs: int  # jobs it ran between its two windows: what a leak per job raises the floor over
    first_floor: int  # bytes: the lowest sample over its first WINDOW_JOBS jobs after warm-up
    last_floor: int  # ... and over its last WINDOW_JOBS jobs

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
        return self.judged and self.growth > self.bound

    def describe(self) -> str:
        per_job = self.growth / self.jobs / 1024 if self.jobs else math.nan
        return (f"{self.jobs} jobs: floor {self.first_floor / 2**20:.1f} -> {self.last_floor / 2**20:.1f} MiB "
                f"({self.growth / 2**20:+.1f}, {per_job:+.0f} KiB/job; bound {self.bound / 2**20:.1f} MiB"
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
    return FloorGrowth(last - first - window_jobs, head, tail)
