"""The replica memory checks catch the leak per job they claim to (250 KiB in the chaos soak, 100 KiB over replicas
that live 150 jobs) and pass a replica whose RSS only swings with the buffers of the jobs in flight, creeps as
warm-up goes on, or steps once (synthetic RSS series shaped like the soak's replicas: a floor, tens of MiB of
transient buffers on most samples)."""

from __future__ import annotations

import math
import random

import pytest

from testing.replica_memory import LONG_LIVED, SOAK, WINDOW_JOBS, LeakCheck, floor_growth

BASE = 540 * 2**20
SAMPLES_PER_JOB = 3  # the soak samples about every second; a tiny job takes a few
STEP = 13 * 2**20  # the largest one-off move of a healthy replica's floor seen in the soak (12.7 MiB)
CHECKS = pytest.mark.parametrize("check", [SOAK, LONG_LIVED], ids=["soak", "long-lived"])


def creep_per_job(check: LeakCheck) -> int:
    """About the most a healthy replica's floor rose per job over the span the check judges: in the soak 134 KiB
    over 45 jobs; over 100 jobs of replicas that keep no freed buffers a few KiB, taken here as 70 % of the bound."""
    return 140 * 1024 if check is SOAK else int(0.7 * check.bound_per_job)


def span(check: LeakCheck) -> int:
    """The fewest jobs of a judged replica."""
    return check.warmup_jobs + WINDOW_JOBS + check.min_judged_jobs + 1


def series(check: LeakCheck, jobs: int, per_job: int, seed: int = 7, warmup_growth: int = 60 * 2**20,
           step: tuple[int, int] = (0, 0)) -> list[tuple[int, int]]:
    """(jobs done, RSS) of a replica: its warm-up grows the RSS, then a floor rising by ``per_job`` per job (and by
    ``step[1]`` bytes at once after job ``step[0]``), with 0-40 MiB of in-flight buffers on three samples out of
    four."""
    rng, out = random.Random(seed), []
    for i in range(jobs * SAMPLES_PER_JOB):
        done = i // SAMPLES_PER_JOB
        warmup = check.warmup_jobs
        floor = BASE + min(done, warmup) * warmup_growth // warmup + max(0, done - warmup) * per_job
        floor += step[1] if step[1] and done > step[0] else 0
        transient = rng.randrange(40 * 2**20) if rng.random() < 0.75 else rng.randrange(256 * 1024)
        out.append((done, floor + transient))
    return out


@CHECKS
def test_the_bound_per_job_is_below_the_leak_it_must_catch(check):
    assert check.bound_per_job <= 0.8 * check.leak_per_job
    assert (check.leak_per_job - check.bound_per_job) * check.min_judged_jobs >= 2 * 10**6  # the margin judged


def test_the_long_lived_check_catches_100_kib_per_job():
    assert LONG_LIVED.leak_per_job == 100 * 1024 and SOAK.leak_per_job == 250 * 1024


def test_a_floor_that_falls_does_not_hide_a_long_lived_leak():
    """A healthy replica's floor may fall while it runs (freed warm-up state): 30 KiB per job under the leak,
    more than any long-lived replica's floor fell, still leaves a leak that breaks the bound on both sides."""
    check = LONG_LIVED
    for seed in range(20):
        for jobs in (span(check), 2 * span(check)):
            falling = floor_growth(series(check, jobs, -30 * 1024, seed), check)
            leaking = floor_growth(series(check, jobs, check.leak_per_job - 30 * 1024, seed), check)
            assert falling is not None and falling.judged and not falling.leaked, falling.describe()
            assert leaking is not None and leaking.leaked, leaking.describe()


@CHECKS
def test_a_leak_fails_and_transients_or_warm_up_creep_pass(check):
    for seed in range(20):
        for jobs in (span(check), 2 * span(check)):
            flat = floor_growth(series(check, jobs, 0, seed), check)
            creeping = floor_growth(series(check, jobs, creep_per_job(check), seed), check)
            leaking = floor_growth(series(check, jobs, check.leak_per_job, seed), check)
            assert flat is not None and flat.judged and not flat.leaked, flat.describe()
            assert creeping is not None and not creeping.leaked, creeping.describe()
            assert leaking is not None and leaking.judged and leaking.leaked, leaking.describe()


@CHECKS
def test_a_one_off_step_of_the_floor_passes_and_a_leak_with_a_step_still_fails(check):
    """An allocator arena taken into use raises the floor once, by as much as the leak adds over the whole span: it
    rises on one side of the split just before it, a leak on both sides of every split, with a step or not."""
    for seed in range(20):
        for jobs in (span(check), 2 * span(check)):
            stride = 4 if check is SOAK else 12
            for at in range(check.warmup_jobs + 1, jobs - 1, stride):
                stepped = floor_growth(series(check, jobs, 0, seed, step=(at, STEP)), check)
                assert stepped is not None and not stepped.leaked, (at, stepped.describe())
            middle = floor_growth(series(check, jobs, 0, seed, step=(jobs // 2, STEP)), check)
            if jobs == span(check):  # a bound on the whole span's rise alone would call it a leak
                assert middle.growth > check.bound_per_job * middle.jobs, middle.describe()
            for at in range(check.warmup_jobs + 1, jobs - 1, stride):
                leaking = floor_growth(series(check, jobs, check.leak_per_job, seed, step=(at, STEP)), check)
                assert leaking is not None and leaking.leaked, (at, leaking.describe())


@CHECKS
def test_the_check_of_two_single_samples_would_miss_that_leak(check):
    """Why floors: the last sample minus the first after warm-up swings by the in-flight buffers, far more than
    the leak adds over the judged span, so a bound on it would have to be loose enough to let the leak through."""
    swings = []
    for seed in range(20):
        samples = [s for s in series(check, span(check), 0, seed) if s[0] >= check.warmup_jobs]
        swings.append(abs(samples[-1][1] - samples[0][1]))
    assert max(swings) > (span(check) - check.warmup_jobs) * check.leak_per_job


@CHECKS
def test_a_replica_that_ran_too_few_jobs_is_not_judged(check):
    short = floor_growth(series(check, span(check) - 2, check.leak_per_job), check)
    assert short is not None and not short.judged and not short.leaked
    too_short = series(check, check.warmup_jobs + 2 * WINDOW_JOBS - 1, 0)
    assert floor_growth(too_short, check) is None  # no two windows after warm-up
    assert floor_growth([], check) is None


@CHECKS
def test_a_replica_with_no_sample_in_the_middle_third_is_judged_by_its_whole_rise(check):
    """Jobs that ended faster than the samples leave no split to tell a step by: the check falls back to the bound
    on the whole rise (a leak still fails, a flat floor passes) instead of failing on an empty middle."""
    def gapped(per_job: int) -> list[tuple[int, int]]:
        samples = series(check, 2 * span(check), per_job)
        first, last = check.warmup_jobs, samples[-1][0] - WINDOW_JOBS
        third = (last - first) / 3
        return [(j, rss) for j, rss in samples if not first + third - 1 <= j <= last - third + 1]

    leaking, flat = floor_growth(gapped(check.leak_per_job), check), floor_growth(gapped(0), check)
    assert leaking.lesser_side == flat.lesser_side == math.inf  # no split there
    assert leaking.leaked and not flat.leaked


DIP = 10 * 2**20  # a moment a replica held less than its floor (a Postprocessor's dips reach 5-10 MiB)


@CHECKS
def test_a_dip_below_the_floor_does_not_hide_a_leak_or_make_one(check):
    """A few samples below the floor (the replica held less for a moment) lower the floor only of the windows that
    hold them: a leak still fails and a flat floor still passes, wherever the dip falls."""
    for seed in range(0, 20, 4):
        jobs = span(check) + 10
        leak, healthy = series(check, jobs, check.leak_per_job, seed), series(check, jobs, 0, seed)
        for at in range(check.warmup_jobs + WINDOW_JOBS, jobs - WINDOW_JOBS, 7):
            leaking = floor_growth([(done, rss - DIP if done == at else rss) for done, rss in leak], check)
            flat = floor_growth([(done, rss - DIP if done == at else rss) for done, rss in healthy], check)
            assert leaking.leaked, (at, leaking.describe())
            assert not flat.leaked, (at, flat.describe())
