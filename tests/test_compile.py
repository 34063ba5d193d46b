"""The ``compile`` setting: Inductor-compiled DiT blocks give the eager output up to fp32 reordering (tiny, CPU).

Tolerance: atol 1e-5, rtol 0, on predictions of magnitude ~2.5. Inductor fuses the blocks' elementwise chains and
LayerNorm/RMSNorm reductions and vectorises exp/tanh, so single fp32 roundings move (measured max |d| 8.3e-7 here).
1e-5 is 12x that and below every plausible real mistake the golden tests separate (2e-5..1e-4: adapter eps, exact
GELU, fp32 sinusoid), so a compiled graph that computes something else fails.

Takes ~40-140 s on 2 CPU cores (gcc builds ~25 Inductor kernels; a warm ``/tmp/torchinductor_$USER`` cache, e.g.
from ``bench/bench_gpu.py --quick`` at the same tiny geometry, makes it ~30 s).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses

import torch
from torch._dynamo.utils import counters

from pipeline.compile import COMPILED_ATTR
from pipeline.denoise import WindowDenoiser, WindowStep
from pipeline.generator import GenerationParams, PipelineSettings, StableAvatarPipeline
from pipeline.loading import load_models
from pipeline.presets import get_preset
from testing.media import EXAMPLE_IMAGE, synthetic_speech

ATOL = 1e-5


def test_compiled_dit_matches_eager_output(tmp_path):
    models = load_models(get_preset("tiny"))
    eager = WindowDenoiser(copy.deepcopy(models.transformer))
    pipeline = StableAvatarPipeline(models, PipelineSettings(compile=True))
    compiled = pipeline.window_denoiser
    assert getattr(models.transformer, COMPILED_ATTR) == "repeated_blocks"
    assert all(block._compiled_call_impl is not None for block in models.transformer.blocks)
    assert eager.transformer.blocks[0]._compiled_call_impl is None

    audio = synthetic_speech(tmp_path / "speech.wav", 5.0)
    prepared = pipeline.prepare(EXAMPLE_IMAGE, audio, GenerationParams(prompt="a person talking",
                                                                       num_inference_steps=2, seed=1))
    cond, latents = prepared.conditioning, pipeline.initial_latents(prepared)
    window = prepared.plan.windows[1]
    x = latents[:, :, window.start:window.end]
    inputs = compiled.model_inputs(cond, window.index, 0, x, (0, 1, 2))
    frames_before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        (ours,) = compiled.transformer(**inputs, return_dict=False)
        (reference,) = eager.transformer(**inputs, return_dict=False)
    assert counters["stats"]["unique_graphs"] > frames_before  # Dynamo really captured the blocks
    assert reference.abs().max() > 1.0
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)

    # The whole run through the setting: compiled blocks, same result within the tolerance (one Euler step scales
    # the prediction by |sigma_1 - sigma_0| < 1, and the fused latents are rounded to bf16).
    step = WindowStep(window.index, 0, x)
    torch.testing.assert_close(compiled(cond, step), eager(cond, step), atol=ATOL, rtol=0)
    compiled_run = asyncio.run(pipeline.denoise(prepared))
    eager_run = asyncio.run(StableAvatarPipeline(
        dataclasses.replace(models, transformer=eager.transformer)).denoise(prepared))
    difference = (compiled_run - eager_run).abs()
    assert difference.max() <= 0.0625 and (difference > 0).float().mean() < 0.01  # at most a few bf16 flips

