"""The Orchestrator's unit plan: split rows and the step cache from the settings, checkpoints taken only where a
resumed run needs nothing but the fused latents, and a resume that lands on a skipped step computed instead."""

from __future__ import annotations

import asyncio

import pytest
import torch

from deployments.orchestrator.units import UnitPlan, unit_plan
from pipeline.denoise import denoise
from pipeline.generator import GenerationParams, PipelineSettings, StableAvatarPipeline
from pipeline.loading import load_models
from pipeline.presets import get_preset
from pipeline.step_cache import StepCachePlan
from testing.media import EXAMPLE_IMAGE, synthetic_speech

PLAN = StepCachePlan((True, True, False, False, True, False, True, True))  # C C S S C S C C


def checkpoints(plan: UnitPlan, num_steps: int, every: int) -> list[int]:
    saved, last = [], -1
    for step in range(num_steps):
        if plan.checkpoint_due(step, num_steps, every, last):
            saved.append(step)
            last = step
    return saved


def test_checkpoints_wait_for_a_computed_next_step():
    assert checkpoints(UnitPlan(), 8, 2) == [1, 3, 5]  # no step cache: every 2 steps, never after the last
    cached = UnitPlan("high", None, PLAN)
    # after step 1 the next (2) reuses: deferred to step 3, whose next (4) is computed; then 5 -> 6 is computed
    assert checkpoints(cached, 8, 2) == [3, 5]
    assert all(PLAN.compute[s + 1] for s in checkpoints(cached, 8, 1))
    assert checkpoints(cached, 8, 0) == []


def test_unit_plan_follows_the_settings_and_computes_a_resumed_skipped_step(tmp_path):
    from pipeline.denoise import RequestConditioning

    cond = RequestConditioning("r", torch.zeros(1, 4), torch.zeros(1, 4), torch.zeros(1, 257, 4),
                               torch.zeros(1, 20, 21, 2, 2), [torch.zeros(1, 2, 4)], 21, 8, 5.0, 4.0)
    assert unit_plan(PipelineSettings(), cond, "none", None).denoise_kwargs() == {"split_guidance": None,
                                                                                  "step_cache": None}
    split = unit_plan(PipelineSettings(split_guidance_rows=True), cond, "high", PLAN)
    assert (split.split_guidance.text_scale, split.split_guidance.audio_scale) == (5.0, 4.0)
    assert split.step_cache is PLAN
    assert split.describe() == ("guidance rows as separate units, acceleration high: 5 of 8 steps computed, "
                                "3 reuse a residual")
    resumed = unit_plan(PipelineSettings(), cond, "high", PLAN, start_step=3).step_cache
    assert resumed.compute == (True, True, False, True, True, False, True, True)


@pytest.fixture(scope="module")
def prepared_pair(tmp_path_factory):
    pipeline = StableAvatarPipeline(load_models(get_preset("tiny")))
    audio = synthetic_speech(tmp_path_factory.mktemp("audio") / "speech.wav", 5.0)
    prepared = pipeline.prepare(EXAMPLE_IMAGE, audio, GenerationParams(prompt="talking", num_inference_steps=8,
                                                                       seed=3))
    return pipeline, prepared


def test_a_run_resumed_from_any_checkpoint_is_identical(prepared_pair):
    """Checkpoints taken where ``checkpoint_due`` says resume on a cold step cache (a new process) without anchor
    latents and give the uninterrupted run's latents."""
    pipeline, prepared = prepared_pair
    plan = UnitPlan("high", None, PLAN)
    saved: dict[int, torch.Tensor] = {}
    last = [-1]

    def on_step(step: int, latents: torch.Tensor) -> None:
        if plan.checkpoint_due(step, 8, 1, last[0]):
            saved[step] = latents.clone()
            last[0] = step

    initial = pipeline.initial_latents(prepared)
    reference = asyncio.run(denoise(prepared.plan, initial, 8, pipeline.in_process_executor(prepared),
                                    on_step=on_step, **plan.denoise_kwargs()))
    assert sorted(saved) == [0, 3, 5, 6]
    for step, latents in saved.items():
        resumed_plan = unit_plan(PipelineSettings(), prepared.conditioning, "high", PLAN, start_step=step + 1)
        assert resumed_plan.step_cache == PLAN  # a checkpoint never lands before a skipped step
        resumed = asyncio.run(denoise(prepared.plan, latents, 8, pipeline.in_process_executor(prepared),
                                      start_step=step + 1, **resumed_plan.denoise_kwargs()))
        assert torch.equal(resumed, reference), step
