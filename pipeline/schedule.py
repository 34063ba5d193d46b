"""Flow-matching sigma schedule (shift 5) and the Euler step, as pure functions of a step index.

The table comes from diffusers' ``FlowMatchEulerDiscreteScheduler`` (bit-identical to what upstream used), but the
scheduler object itself is not kept: it is stateful (``_step_index``), and a window-step must be a pure function of
its inputs so it can run on any replica, in any order, and be retried.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

FLOW_SHIFT = 5.0
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class SigmaSchedule:
    """``sigmas`` has N+1 float32 entries ending in 0; ``timesteps`` (= sigma·1000) has N, fed to the model as floats."""

    sigmas: torch.Tensor  # [N+1] float32
    timesteps: torch.Tensor  # [N] float32

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def delta(self, step: int) -> torch.Tensor:
        """``sigma[step+1] - sigma[step]`` as a 0-d float32 tensor (a tensor, not a Python float, so the bf16 product
        rounds exactly as the upstream scheduler's does)."""
        return self.sigmas[step + 1] - self.sigmas[step]


@lru_cache(maxsize=64)
def sigma_schedule(num_steps: int, shift: float = FLOW_SHIFT) -> SigmaSchedule:
    # Imported here: importing diffusers costs seconds of CPU in every process that loads this module (the
    # Orchestrator plans steps with it but runs no model), and the table is computed once per step count.
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift, use_dynamic_shifting=False,
        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )
    scheduler.set_timesteps(num_steps, device="cpu")
    sigmas = scheduler.sigmas.to(torch.float32).clone()
    timesteps = scheduler.timesteps.to(torch.float32).clone()
    return SigmaSchedule(sigmas=sigmas, timesteps=timesteps)


def guided_velocity(noise_pred: torch.Tensor, audio_scale: float, text_scale: float) -> torch.Tensor:
    """CFG over the batch-3 rows [neg text + null audio, neg text + audio, pos text + audio] (reference §3.5).

    ``v = v_u + s_a·(v_a − v_u) + s_t·(v_c − v_a)``, evaluated op by op in the input dtype, left to right, as upstream.
    """
    # noise_pred: [3, 16, L, h, w] -> [1, 16, L, h, w]
    v_uncond, v_audio, v_cond = noise_pred.chunk(3)
    return v_uncond + audio_scale * (v_audio - v_uncond) + text_scale * (v_cond - v_audio)


def euler_step(sample: torch.Tensor, velocity: torch.Tensor, schedule: SigmaSchedule, step: int) -> torch.Tensor:
    """``x + (σ_{i+1} − σ_i)·v``: sample upcast to fp32, result cast back to the velocity dtype (diffusers semantics)."""
    return (sample.to(torch.float32) + schedule.delta(step) * velocity).to(velocity.dtype)


def guided_step(noise_pred: torch.Tensor, sample: torch.Tensor, schedule: SigmaSchedule, step: int,
                audio_scale: float, text_scale: float) -> torch.Tensor:
    """One window's step from its three guidance rows: CFG combination in the sample's dtype, then Euler.

    noise_pred: ``[3, 16, L, h, w]`` rows [neg text + null audio, neg text + audio, pos text + audio] (any dtype);
    sample: ``[1, 16, L, h, w]`` the window's latents in the state dtype, on the device the arithmetic runs on.
    The batch-3 Denoiser runs it on its device right after the forward; with split rows the denoise loop runs it
    where the rows meet. Returns ``[1, 16, L, h, w]`` in the state dtype.
    """
    velocity = guided_velocity(noise_pred.to(sample.dtype), audio_scale, text_scale)
    return euler_step(sample, velocity, schedule, step)
