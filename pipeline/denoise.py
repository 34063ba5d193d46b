"""The denoising loop, written once against a small executor interface.

Per step, every window is denoised from the previous step's latents (Jacobi: windows of a step are independent),
then the overlaps are fused. Executors decide where and in which order window-steps run: in this process
(``InProcessExecutor``) or on Ray Serve Denoiser replicas. The loop only sees "run these window-steps, give me their
outputs", so the result is bit-identical whatever the order, placement or replica count.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from pipeline.schedule import SigmaSchedule, euler_step, guided_velocity, sigma_schedule
from pipeline.windows import WeightScheme, WindowPlan, fuse_step

CFG_AUDIO_ROWS = (False, True, True)  # rows: [neg text + null audio, neg text + audio, pos text + audio]


@dataclass
class RequestConditioning:
    """Everything a window-step needs besides its latents; computed once per request, never per step."""

    request_id: str
    text_positive: torch.Tensor  # [n_pos, text_dim] T5 rows, real length
    text_negative: torch.Tensor  # [n_neg, text_dim]
    clip_context: torch.Tensor  # [1, 257, image_dim]
    y: torch.Tensor  # [1, 20, 21, h, w] mask (4) + reference latent (16) for a full window
    audio_features: list[torch.Tensor]  # per window: [1, N_k, audio_dim] wav2vec features of its own slice
    seq_len: int  # tokens of a full 21-frame window: 21·(h/2)·(w/2)
    num_steps: int
    text_scale: float
    audio_scale: float

    @property
    def schedule(self) -> SigmaSchedule:
        return sigma_schedule(self.num_steps)



@dataclass(frozen=True)
class WindowStep:
    """One unit of work: window ``window`` at denoising step ``step``, starting from ``latents``."""

    window: int
    step: int
    latents: torch.Tensor  # [1, 16, L, h, w] in the state dtype


class WindowDenoiser:
    """One window, one step: a batch-3 CFG forward of the DiT, the guidance combination and the Euler step."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer

    @torch.no_grad()
    def __call__(self, cond: RequestConditioning, work: WindowStep) -> torch.Tensor:
        latents = work.latents  # [1, 16, L, h, w]
        length = latents.shape[2]
        param = next(self.transformer.parameters())
        device, dtype = param.device, param.dtype
        x = latents.to(device, dtype).repeat(3, 1, 1, 1, 1)  # [3, 16, L, h, w]
        y = cond.y[:, :, :length].to(device, dtype).repeat(3, 1, 1, 1, 1)  # [3, 20, L, h, w]
        timestep = cond.schedule.timesteps[work.step].expand(3).to(device)  # [3] float, sigma·1000
        negative, positive = cond.text_negative.to(device, dtype), cond.text_positive.to(device, dtype)
        clip = cond.clip_context.to(device, dtype).repeat(3, 1, 1)  # [3, 257, image_dim]
        audio = cond.audio_features[work.window].to(device, dtype)  # [1, N, audio_dim]
        noise_pred = self.transformer(
            latents=x, y=y, timestep=timestep, text_context=[negative, negative, positive], clip_fea=clip,
            audio_features=audio, audio_rows=CFG_AUDIO_ROWS, seq_len=cond.seq_len,
        )  # [3, 16, L, h, w]
        velocity = guided_velocity(noise_pred.to(latents.dtype), cond.audio_scale, cond.text_scale)
        stepped = euler_step(latents.to(device), velocity, cond.schedule, work.step)
        return stepped.cpu()  # [1, 16, L, h, w] in the state dtype


class WindowStepExecutor(Protocol):
    """Runs a batch of window-steps (any order, anywhere) and returns their outputs in the order given."""

    async def run(self, steps: Sequence[WindowStep]) -> list[torch.Tensor]: ...


class InProcessExecutor:
    """Runs window-steps one after another in this process; yields to the event loop between them."""

    def __init__(self, denoiser: WindowDenoiser, conditioning: RequestConditioning,
                 on_window_step: Callable[[WindowStep], None] | None = None):
        self.denoiser, self.conditioning = denoiser, conditioning
        self.on_window_step = on_window_step

    async def run(self, steps: Sequence[WindowStep]) -> list[torch.Tensor]:
        outputs = []
        for work in steps:
            outputs.append(self.denoiser(self.conditioning, work))
            if self.on_window_step is not None:
                self.on_window_step(work)
            await asyncio.sleep(0)  # cancellation point
        return outputs


def initial_noise(seed: int, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The whole latent's noise, drawn once in bf16 from a CPU generator (as fal's fork and upstream app.py do),
    so windows share noise in their overlaps and the result does not depend on devices or replica count."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.bfloat16).to(dtype)


StepCallback = Callable[[int, torch.Tensor], Awaitable[None] | None]


async def denoise(
    plan: WindowPlan,
    latents: torch.Tensor,
    num_steps: int,
    executor: WindowStepExecutor,
    weight_scheme: WeightScheme = "uniform",
    start_step: int = 0,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Run steps ``start_step..num_steps-1`` over all windows; ``latents`` is [1, 16, T, h, w] (state dtype).

    ``on_step(step, latents)`` runs after each fused step (progress, checkpoints); starting from a checkpoint
    with ``start_step`` gives the same result as an uninterrupted run.
    """
    for step in range(start_step, num_steps):
        work = [WindowStep(w.index, step, latents[:, :, w.start:w.end]) for w in plan.windows]
        outputs = await executor.run(work)
        latents = fuse_step(latents, outputs, plan.windows, step, plan.overlap, weight_scheme)
        if on_step is not None:
            result = on_step(step, latents)
            if asyncio.iscoroutine(result):
                await result
    return latents
