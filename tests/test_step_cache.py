"""The step cache: TeaCache's rule, state per (request, window, rows), bounded memory, and outputs that do not
depend on unit order, placement, cold runners or restarts."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch

from pipeline.denoise import GuidanceScales, InProcessExecutor, WindowDenoiser, WindowStep, denoise
from pipeline.generator import GenerationParams, PipelineSettings, StableAvatarPipeline
from pipeline.loading import load_models
from pipeline.presets import get_preset
from pipeline.step_cache import (
    WAN21_1P3B_E0_COEFFICIENTS,
    CacheDirective,
    StepCache,
    StepCachePlan,
    StepCacheSettings,
    fitted_range_limit,
    plan_for,
    plan_step_cache,
    rescale,
)
from testing.media import EXAMPLE_IMAGE, synthetic_speech

# C C S S C C: steps 2 and 3 reuse step 1's residual. The tiny preset's random time embedder moves e0 far outside
# the range TeaCache's polynomial was fitted on, so its threshold plans compute every step; tests that need skips
# use this hand-made plan (the rule itself is tested on synthetic inputs below).
HAND_PLAN = StepCachePlan((True, True, False, False, True, True))
STEPS = HAND_PLAN.num_steps


# -- the rule -----------------------------------------------------------------------------------------------------
def modulation_with_distances(distances: Sequence[float]) -> torch.Tensor:
    """``[N, 6, 4]`` values whose consecutive relative L1 distances are ``distances``."""
    values = [1.0]
    for d in distances:
        values.append(values[-1] * (1 + d))
    return torch.tensor(values, dtype=torch.float64).view(-1, 1, 1).expand(-1, 6, 4).clone()


def test_constants_are_teacache_wan21_1p3b_ret_steps():
    assert WAN21_1P3B_E0_COEFFICIENTS == (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01,
                                          -4.99875664e-02)
    settings = StepCacheSettings()
    assert (settings.regular_threshold, settings.high_threshold, settings.always_compute_first) == (0.05, 0.10, 5)
    for x in (0.0, 0.003, 0.01, 0.05, 0.12):
        assert rescale(x, WAN21_1P3B_E0_COEFFICIENTS) == pytest.approx(np.poly1d(WAN21_1P3B_E0_COEFFICIENTS)(x),
                                                                      rel=1e-12, abs=1e-12)
    assert fitted_range_limit(WAN21_1P3B_E0_COEFFICIENTS) == pytest.approx(0.07922, abs=1e-4)


def test_plan_accumulates_rescaled_distances_until_the_threshold():
    # distance 0.01 per step rescales to 0.0429: two skips, then the third step's sum 0.129 >= 0.1 computes
    modulation = modulation_with_distances([0.01] * 9)
    plan = plan_step_cache(modulation, threshold=0.1, always_compute_first=2)
    assert plan.compute == (True, True, False, False, True, False, False, True, False, True)
    assert [plan.anchor(s) for s in range(10)] == [0, 1, 1, 1, 4, 4, 4, 7, 7, 9]
    assert [plan.keeps(s) for s in range(10)] == [False, True, False, False, True, False, False, True, False, False]
    # the first N and the last step are always computed, whatever the threshold
    assert plan_step_cache(modulation, threshold=1.0, always_compute_first=5).compute == (True,) * 5 + (False,) * 4 + (True,)
    # a threshold of 0 computes every step, although the polynomial is negative for tiny distances
    tiny_moves = modulation_with_distances([0.001] * 9)
    assert rescale(0.001, WAN21_1P3B_E0_COEFFICIENTS) < 0
    assert plan_step_cache(tiny_moves, threshold=0.0, always_compute_first=1).compute == (True,) * 10


def test_fitted_range_guard_computes_steps_that_move_further_than_the_fit():
    # 0.12 rescales to -0.88 (the quartic has turned down): unguarded TeaCache skips exactly the big moves
    modulation = modulation_with_distances([0.12] * 5)
    unguarded = plan_step_cache(modulation, threshold=0.1, always_compute_first=1)
    guarded = plan_for(StepCacheSettings(always_compute_first=1), modulation, "high")
    assert unguarded.compute == (True, False, False, False, False, True)
    assert guarded.compute == (True,) * 6


# -- the store ----------------------------------------------------------------------------------------------------
def test_store_is_a_bounded_lru_that_frees_requests():
    cache = StepCache(max_entries=2, max_bytes=10_000)
    residual = torch.zeros(100)  # 400 bytes
    cache.put(("a", 0, (0, 1, 2)), 1, residual)
    cache.put(("a", 1, (0, 1, 2)), 1, residual)
    assert cache.get(("a", 0, (0, 1, 2)), 1) is residual  # now the most recently used
    cache.put(("b", 0, (0,)), 3, residual)
    assert len(cache) == 2 and cache.stats.evicted == 1 and cache.get(("a", 1, (0, 1, 2)), 1) is None
    assert cache.get(("a", 0, (0, 1, 2)), 2) is None  # a residual of another step is not this step's
    assert cache.nbytes == 800
    assert cache.free("a") == 1 and len(cache) == 1 and cache.nbytes == 400
    cache.put(("c", 0, (0,)), 1, torch.zeros(5000))  # larger than the whole budget: evicts all, kept never
    assert len(cache) == 0 and cache.nbytes == 0

    by_bytes = StepCache(max_entries=100, max_bytes=1000)
    for window in range(4):
        by_bytes.put(("r", window, (1,)), 0, residual)
    assert len(by_bytes) == 2 and by_bytes.nbytes == 800


# -- in the pipeline ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models():
    return load_models(get_preset("tiny"))


@pytest.fixture(scope="module")
def prepared_pair(models, tmp_path_factory):
    """(pipeline, prepared) for a 5 s clip (2 windows) of HAND_PLAN's step count."""
    audio = synthetic_speech(tmp_path_factory.mktemp("audio") / "speech.wav", 5.0)
    pipeline = StableAvatarPipeline(models)
    prepared = pipeline.prepare(EXAMPLE_IMAGE, audio, GenerationParams(prompt="a person talking",
                                                                       num_inference_steps=STEPS, seed=4))
    assert prepared.plan.num_windows == 2
    return pipeline, prepared


class PlacedExecutor:
    """Units spread over ``runners`` step caches (replicas) by ``place(unit, index)``, in a seeded random order;
    ``kill_after`` empties runner 0 after that step (a replica restart)."""

    def __init__(self, denoiser: WindowDenoiser, cond, runners: int, place: Callable[[WindowStep, int], int],
                 order_seed: int | None = None, kill_after: int | None = None):
        self.denoiser, self.cond, self.place = denoiser, cond, place
        self.caches = [StepCache() for _ in range(runners)]
        self.rng = random.Random(order_seed) if order_seed is not None else None
        self.kill_after = kill_after
        self.units: list[WindowStep] = []

    async def run(self, steps: Sequence[WindowStep]) -> list[torch.Tensor]:
        order = list(range(len(steps)))
        if self.rng is not None:
            self.rng.shuffle(order)
        results = {}
        for i in order:
            results[i] = self.denoiser(self.cond, steps[i], self.caches[self.place(steps[i], i) % len(self.caches)])
        self.units.extend(steps)
        if self.kill_after is not None and steps[0].step == self.kill_after:
            self.caches[0] = StepCache()
        return [results[i] for i in range(len(steps))]

    def total(self, counter: str) -> int:
        return sum(getattr(cache.stats, counter) for cache in self.caches)


def run_plan(pipeline, prepared, executor, plan: StepCachePlan | None, split: bool) -> torch.Tensor:
    cond = prepared.conditioning
    return asyncio.run(denoise(
        prepared.plan, pipeline.initial_latents(prepared), STEPS, executor,
        split_guidance=GuidanceScales(cond.text_scale, cond.audio_scale) if split else None, step_cache=plan))


def test_acceleration_none_never_enters_the_step_cache(prepared_pair, monkeypatch):
    pipeline, prepared = prepared_pair
    assert prepared.acceleration == "none" and pipeline.step_cache_plan(prepared) is None

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("the step cache was entered")

    monkeypatch.setattr(WindowDenoiser, "_cached_forward", must_not_run)
    executor = PlacedExecutor(pipeline.window_denoiser, prepared.conditioning, 1, lambda u, i: 0)
    latents = asyncio.run(pipeline.denoise(prepared, executor))
    assert all(unit.cache is None for unit in executor.units) and len(executor.units) == 2 * STEPS
    assert executor.caches[0].stats.as_dict() == StepCache().stats.as_dict()
    assert torch.equal(latents, asyncio.run(pipeline.denoise(prepared)))


def test_threshold_zero_computes_every_step_bit_identical_to_none(models, prepared_pair):
    pipeline, prepared = prepared_pair
    none = asyncio.run(pipeline.denoise(prepared))
    settings = PipelineSettings(acceleration="high", step_cache=StepCacheSettings(
        high_threshold=0.0, always_compute_first=1, guard_fitted_range=False))
    zero = StableAvatarPipeline(models, settings)
    plan = zero.step_cache_plan(prepared_with(prepared, "high"))
    assert plan.compute == (True,) * STEPS
    executor = zero.in_process_executor(prepared)
    latents = run_plan(zero, prepared, executor, plan, split=False)
    assert torch.equal(latents, none)
    stats = executor.step_cache.stats
    assert (stats.computed, stats.reused, stats.rebuilt, stats.row_forwards_skipped) == (2 * STEPS, 0, 0, 0)


def prepared_with(prepared, level):
    return dataclasses.replace(prepared, acceleration=level)


@pytest.mark.parametrize("split", [False, True])
def test_cached_run_reuses_each_units_residual_and_counts_forwards(prepared_pair, split):
    pipeline, prepared = prepared_pair
    executor = pipeline.in_process_executor(prepared)
    cached = run_plan(pipeline, prepared, executor, HAND_PLAN, split)
    uncached = run_plan(pipeline, prepared, pipeline.in_process_executor(prepared), None, split)
    units_per_step, rows = (6, 1) if split else (2, 3)
    stats = executor.step_cache.stats
    assert (stats.computed, stats.reused, stats.rebuilt) == (4 * units_per_step, 2 * units_per_step, 0)
    assert (stats.row_forwards_computed, stats.row_forwards_skipped) == (4 * units_per_step * rows,
                                                                         2 * units_per_step * rows)
    assert len(executor.step_cache) == 0  # step 4 computes without keeping: the residuals are gone
    assert not torch.equal(cached, uncached)  # the skipped steps really reused a residual
    assert cached.isfinite().all()


@pytest.mark.parametrize("split", [False, True])
def test_cached_run_is_identical_across_unit_order_placement_and_replica_kills(prepared_pair, split):
    pipeline, prepared = prepared_pair
    denoiser, cond = pipeline.window_denoiser, prepared.conditioning
    one = PlacedExecutor(denoiser, cond, 1, lambda u, i: 0)
    reference = run_plan(pipeline, prepared, one, HAND_PLAN, split)
    assert one.total("rebuilt") == 0 and one.total("reused") > 0

    sticky = PlacedExecutor(denoiser, cond, 3, lambda u, i: u.window * 3 + u.rows[0], order_seed=1)
    moving = PlacedExecutor(denoiser, cond, 3, lambda u, i: i + u.step, order_seed=2)  # new replica every step
    killed = PlacedExecutor(denoiser, cond, 3, lambda u, i: u.window * 3 + u.rows[0], kill_after=1)
    for executor in (sticky, moving, killed):
        assert torch.equal(run_plan(pipeline, prepared, executor, HAND_PLAN, split), reference)
    assert sticky.total("rebuilt") == 0
    assert moving.total("rebuilt") > 0 and killed.total("rebuilt") > 0  # cold runners rebuilt, same bits


def test_one_units_state_never_reaches_another(prepared_pair):
    """Two windows (different latents and audio) and two rows interleaved through one store give exactly what
    each computes alone; planting one window's residual under the other's key would change it."""
    pipeline, prepared = prepared_pair
    denoiser, cond = pipeline.window_denoiser, prepared.conditioning
    latents = pipeline.initial_latents(prepared)
    units = [(w.index, latents[:, :, w.start:w.end] * (1 + 0.1 * step), rows)
             for step in range(4) for w in prepared.plan.windows for rows in ((0, 1, 2), (2,))]

    def directive(step):
        return HAND_PLAN.directive(step, None)  # anchors are never needed while the store is warm

    def unit(i):
        window, x, rows = units[i]
        step = i // 4
        return WindowStep(window, step, x, rows, directive(step))

    shared = StepCache()
    together = [denoiser(cond, unit(i), shared) for i in range(len(units))]
    for own in range(4):
        alone_cache = StepCache()
        alone = [denoiser(cond, unit(i), alone_cache) for i in range(own, len(units), 4)]
        assert all(torch.equal(a, b) for a, b in zip(alone, together[own::4], strict=True))

    # sensitivity: window 1 reusing window 0's residual at step 2 gives something else
    other = StepCache()
    denoiser(cond, unit(0), other)
    denoiser(cond, unit(4), other)  # window 0, step 1: keeps its residual
    other.put((cond.request_id, 1, (0, 1, 2)), 1, other.get((cond.request_id, 0, (0, 1, 2)), 1))
    assert not torch.equal(denoiser(cond, unit(10), other), together[10])


def test_requests_do_not_share_state(models, prepared_pair):
    pipeline, prepared = prepared_pair
    denoiser = pipeline.window_denoiser
    other = dataclasses.replace(prepared.conditioning, request_id="another", text_scale=2.0)
    x = pipeline.initial_latents(prepared)[:, :, :21]
    shared, own_a, own_b = StepCache(), StepCache(), StepCache()
    outputs = {}
    for step in range(4):
        for name, cond, own in (("a", prepared.conditioning, own_a), ("b", other, own_b)):
            work = WindowStep(0, step, x * (1 + step), cache=HAND_PLAN.directive(step, None))
            outputs[(name, step, "shared")] = denoiser(cond, work, shared)
            outputs[(name, step, "own")] = denoiser(cond, work, own)
    assert all(torch.equal(outputs[(n, s, "shared")], outputs[(n, s, "own")]) for n in "ab" for s in range(4))
    assert shared.free("another") == 1 and len(shared) == 1


def test_missing_residual_without_anchor_is_an_error(prepared_pair):
    from pipeline.denoise import ResidualMissingError

    pipeline, prepared = prepared_pair
    x = pipeline.initial_latents(prepared)[:, :, :21]
    with pytest.raises(ResidualMissingError, match="step 1"):
        pipeline.window_denoiser(prepared.conditioning, WindowStep(0, 2, x, cache=CacheDirective(reuse_from=1)),
                                 StepCache())


def test_resuming_inside_a_skip_run_uses_the_anchor_latents(prepared_pair):
    pipeline, prepared = prepared_pair
    saved = {}
    initial = pipeline.initial_latents(prepared)
    reference = asyncio.run(denoise(prepared.plan, initial, STEPS, pipeline.in_process_executor(prepared),
                                    step_cache=HAND_PLAN, on_step=lambda s, x: saved.setdefault(s, x.clone())))
    with pytest.raises(ValueError, match="anchor_latents"):
        asyncio.run(denoise(prepared.plan, saved[2], STEPS, pipeline.in_process_executor(prepared),
                            start_step=3, step_cache=HAND_PLAN))
    executor = pipeline.in_process_executor(prepared)  # a new process: cold store
    resumed = asyncio.run(denoise(prepared.plan, saved[2], STEPS, executor, start_step=3, step_cache=HAND_PLAN,
                                  anchor_latents=saved[0]))  # step 1's input = latents after step 0
    assert torch.equal(resumed, reference) and executor.step_cache.stats.rebuilt == 2


def test_per_request_level_reaches_the_plan_and_the_store_is_freed(models, prepared_pair, tmp_path):
    """Unguarded TeaCache on the tiny preset skips every step after the first ones (its e0 moves 0.2-0.5 per step,
    where the polynomial is negative): the whole pipeline path runs with skips, deterministically."""
    _, base = prepared_pair
    settings = PipelineSettings(step_cache=StepCacheSettings(always_compute_first=2, guard_fitted_range=False))
    pipeline = StableAvatarPipeline(models, settings)
    audio = synthetic_speech(tmp_path / "speech.wav", 5.0)
    params = GenerationParams(prompt="a person talking", num_inference_steps=STEPS, seed=4, acceleration="high")
    prepared = pipeline.prepare(EXAMPLE_IMAGE, audio, params)
    assert prepared.acceleration == "high"
    assert pipeline.prepare(EXAMPLE_IMAGE, audio, GenerationParams(prompt="x")).acceleration == "none"
    assert pipeline.step_cache_plan(prepared).compute == (True, True, False, False, False, True)
    executors: list[InProcessExecutor] = []

    def factory(p):
        executors.append(pipeline.in_process_executor(p))
        return executors[-1]

    first = asyncio.run(pipeline.denoise(prepared, factory(prepared)))
    second = asyncio.run(pipeline.denoise(prepared, factory(prepared)))
    assert torch.equal(first, second)
    assert executors[0].step_cache.stats.reused == 2 * 3 and len(executors[0].step_cache) == 0
    assert not torch.equal(first, asyncio.run(pipeline.denoise(prepared_with(prepared, "none"))))
