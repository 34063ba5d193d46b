"""A stand-in DiT for fan-out benchmarks: sleeps a fixed time per call and returns a deterministic tensor."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput


class SimulatedTransformer(torch.nn.Module):
    """Same call signature as ``StableAvatarTransformer3DModel.forward``; no arithmetic worth measuring."""

    def __init__(self, step_s: float):
        super().__init__()
        self.step_s = step_s
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device and dtype

    def forward(self, latents: torch.Tensor, y: torch.Tensor, timestep: torch.Tensor, text_context: Sequence,
                clip_fea: torch.Tensor, audio_features: torch.Tensor | None, audio_rows: Sequence[bool],
                seq_len: int, return_dict: bool = True, **_: object) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        time.sleep(self.step_s)
        # [B, 16, L, h, w]: a deterministic function of the inputs, so runs can be compared bit for bit.
        output = latents * 0.5 + (timestep.view(-1, 1, 1, 1, 1) / 1000).to(latents.dtype)
        return (output,) if not return_dict else Transformer2DModelOutput(sample=output)

    def to_inference_dtype(self, dtype: torch.dtype) -> SimulatedTransformer:
        return self.to(dtype)
