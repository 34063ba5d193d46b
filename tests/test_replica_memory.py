"""The soak's memory check catches a leak of 250 KiB per job and passes a replica whose RSS only swings with the
buffers of the jobs in flight, or creeps as warm-up goes on (synthetic RSS series shaped like the soak's replicas: a
floor, tens of MiB of transient buffers on most samples)."""

from __future__ import annotations

import math
import random

from testing.replica_memory import (
    BOUND_PER_JOB,
    LEAK_PER_JOB,
    MIN_JUDGED_JOBS,
    WARMUP_JOBS,
    WINDOW_JOBS,
    floor_growth,
)

BASE = 540 * 2**20
SAMPLES_PER_JOB = 3  # the soak samples about every second; a tiny job takes a few
CREEP_PER_JOB = 140 * 1024  # about the most a healthy replica's floor rose per job in the soak (134 KiB over 45)
SPAN = WARMUP_JOBS + WINDOW_JOBS + MIN_JUDGED_JOBS + 1  # the fewest jobs of a judged replica


def series(jobs: int, per_job: int, seed: int = 7, warmup_growth: int = 60 * 2**20,
           step: tuple[int, int] = (0, 0)) -> list[tuple[int, int]]:
    """(jobs done, RSS) of a replica: its warm-up grows the RSS, then a floor rising by ``per_job`` per job (and by
    ``step[1]`` bytes at once after job ``step[0]``), with 0-40 MiB of in-flight buffers on three samples out of
    four."""
    rng, out = random.Random(seed), []
    for i in range(jobs * SAMPLES_PER_JOB):
        done = i // SAMPLES_PER_JOB
        floor = BASE + min(done, WARMUP_JOBS) * warmup_growth // WARMUP_JOBS + max(0, done - WARMUP_JOBS) * per_job
        floor += step[1] if step[1] and done > step[0] else 0
        transient = rng.randrange(40 * 2**20) if rng.random() < 0.75 else rng.randrange(256 * 1024)
        out.append((done, floor + transient))
    return out


def test_the_bound_per_job_is_below_the_leak_it_must_catch():
    assert BOUND_PER_JOB <= 0.8 * LEAK_PER_JOB
    assert (LEAK_PER_JOB - BOUND_PER_JOB) * MIN_JUDGED_JOBS >= 2 * 10**6  # the margin a judged replica adds up


def test_a_leak_of_250_kib_per_job_fails_and_transients_or_warm_up_creep_pass():
    for seed in range(20):
        for jobs in (SPAN, 2 * SPAN):
            flat = floor_growth(series(jobs, 0, seed))
            creeping = floor_growth(series(jobs, CREEP_PER_JOB, seed))
            leaking = floor_growth(series(jobs, LEAK_PER_JOB, seed))
            assert flat is not None and flat.judged and not flat.leaked, flat.describe()
            assert creeping is not None and not creeping.leaked, creeping.describe()
            assert leaking is not None and leaking.judged and leaking.leaked, leaking.describe()


STEP = 13 * 2**20  # the largest one-off move of a healthy replica's floor seen in the soak (12.7 MiB)


def test_a_one_off_step_of_the_floor_passes_and_a_leak_with_a_step_still_fails():
    """An allocator arena taken into use raises the floor once, by as much as the leak adds over the whole span: it
    rises on one side of the split just before it, a leak on both sides of every split, with a step or not."""
    for seed in range(20):
        for jobs in (SPAN, 2 * SPAN):
            for at in range(WARMUP_JOBS + 1, jobs - 1, 4):
                stepped = floor_growth(series(jobs, 0, seed, step=(at, STEP)))
                assert stepped is not None and not stepped.leaked, (at, stepped.describe())
                if at == jobs // 2:  # a bound on the whole span's rise alone would call it a leak
                    assert stepped.growth > BOUND_PER_JOB * stepped.jobs, stepped.describe()
            for at in range(WARMUP_JOBS + 1, jobs - 1, 4):
                leaking = floor_growth(series(jobs, LEAK_PER_JOB, seed, step=(at, STEP)))
                assert leaking is not None and leaking.leaked, (at, leaking.describe())


def test_the_check_of_two_single_samples_would_miss_that_leak():
    """Why floors: the last sample minus the first after warm-up swings by the in-flight buffers, far more than
    the leak adds over the judged span, so a bound on it would have to be loose enough to let the leak through."""
    swings = []
    for seed in range(20):
        samples = [s for s in series(SPAN, 0, seed) if s[0] >= WARMUP_JOBS]
        swings.append(abs(samples[-1][1] - samples[0][1]))
    assert max(swings) > (SPAN - WARMUP_JOBS) * LEAK_PER_JOB


def test_a_replica_that_ran_too_few_jobs_is_not_judged():
    short = floor_growth(series(SPAN - 2, LEAK_PER_JOB))
    assert short is not None and not short.judged and not short.leaked
    assert floor_growth(series(WARMUP_JOBS + 2 * WINDOW_JOBS - 1, 0)) is None  # no two windows after its warm-up
    assert floor_growth([]) is None


def test_a_replica_with_no_sample_in_the_middle_third_is_judged_by_its_whole_rise():
    """Jobs that ended faster than the samples leave no split to tell a step by: the check falls back to the bound
    on the whole rise (a leak still fails, a flat floor passes) instead of failing on an empty middle."""
    def gapped(per_job: int) -> list[tuple[int, int]]:
        samples = series(2 * SPAN, per_job)
        first, last = WARMUP_JOBS, samples[-1][0] - WINDOW_JOBS
        third = (last - first) / 3
        return [(j, rss) for j, rss in samples if not first + third - 1 <= j <= last - third + 1]

    leaking, flat = floor_growth(gapped(LEAK_PER_JOB)), floor_growth(gapped(0))
    assert leaking.flattest_side == flat.flattest_side == math.inf  # no split there
    assert leaking.leaked and not flat.leaked
