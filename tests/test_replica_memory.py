"""The soak's memory check catches a leak of 100 KiB per job and passes a replica whose RSS only swings with the
buffers of the jobs in flight (synthetic RSS series shaped like the soak's Preprocessor: a flat floor, tens of MiB of
transient buffers on most samples)."""

from __future__ import annotations

import random

from testing.replica_memory import (
    FLOOR_SLACK,
    LEAK_PER_JOB,
    WARMUP_JOBS,
    WINDOW_JOBS,
    floor_growth,
    min_judged_jobs,
)

BASE = 540 * 2**20
SAMPLES_PER_JOB = 3  # the soak samples about every second; a tiny job takes a few


def series(jobs: int, leak_per_job: int, seed: int = 7, warmup_growth: int = 60 * 2**20) -> list[tuple[int, int]]:
    """(jobs done, RSS) of a replica: its warm-up grows the RSS, then a floor rising by ``leak_per_job`` per job,
    with 0-40 MiB of in-flight buffers on three samples out of four."""
    rng, out = random.Random(seed), []
    for i in range(jobs * SAMPLES_PER_JOB):
        done = i // SAMPLES_PER_JOB
        floor = BASE + min(done, WARMUP_JOBS) * warmup_growth // WARMUP_JOBS + max(0, done - WARMUP_JOBS) * leak_per_job
        transient = rng.randrange(40 * 2**20) if rng.random() < 0.75 else rng.randrange(256 * 1024)
        out.append((done, floor + transient))
    return out


def test_the_smallest_judged_span_lets_a_100_kib_leak_exceed_the_bound():
    jobs = min_judged_jobs()
    assert jobs * LEAK_PER_JOB > 1.2 * FLOOR_SLACK
    assert (jobs - 1) * LEAK_PER_JOB <= 1.25 * FLOOR_SLACK  # the threshold is the smallest such span


def test_a_leak_of_100_kib_per_job_fails_and_transient_buffers_alone_pass():
    span = WARMUP_JOBS + WINDOW_JOBS + min_judged_jobs() + 2
    for seed in range(20):
        healthy = floor_growth(series(span, 0, seed))
        leaking = floor_growth(series(span, LEAK_PER_JOB, seed))
        assert healthy is not None and healthy.judged and not healthy.leaked, healthy.describe()
        assert leaking is not None and leaking.judged and leaking.leaked, leaking.describe()
        assert leaking.bound_per_job < 0.8 * LEAK_PER_JOB


def test_the_check_of_two_single_samples_would_miss_that_leak():
    """Why floors: the last sample minus the first after warm-up swings by the in-flight buffers, far more than
    the leak adds over the judged span, so a bound on it would have to be loose enough to let the leak through."""
    span = WARMUP_JOBS + WINDOW_JOBS + min_judged_jobs() + 2
    swings = []
    for seed in range(20):
        samples = [s for s in series(span, 0, seed) if s[0] >= WARMUP_JOBS]
        swings.append(abs(samples[-1][1] - samples[0][1]))
    assert max(swings) > (span - WARMUP_JOBS) * LEAK_PER_JOB


def test_a_replica_that_ran_too_few_jobs_is_not_judged():
    short = floor_growth(series(WARMUP_JOBS + WINDOW_JOBS + min_judged_jobs() - 2, LEAK_PER_JOB))
    assert short is not None and not short.judged and not short.leaked
    assert floor_growth(series(WARMUP_JOBS + 5, 0)) is None  # not two windows after its warm-up
    assert floor_growth([]) is None
