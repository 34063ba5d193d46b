"""A stand-in DiT for fan-out benchmarks, registered as the ``simulated`` preset when this module is imported.

The service loads it through the app args' ``preset_modules: [bench.simulated]`` (imported in every replica), so
the runtime loader has no benchmark code in it. The DiT sleeps a fixed time per call and returns a deterministic
tensor: benchmarks of the fan-out measure scheduling, not arithmetic.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from pipeline.presets import PRESETS, register_preset

SIMULATED_STEP_S = 0.2


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


def simulated_preset(step_s: float = SIMULATED_STEP_S, name: str = "simulated"):
    """The tiny preset whose DiT is a :class:`SimulatedTransformer` sleeping ``step_s`` per call."""
    return dataclasses.replace(
        PRESETS["tiny"], name=name, transformer_factory=functools.partial(SimulatedTransformer, step_s),
        description=f"tiny preset whose DiT sleeps {step_s} s per call (benchmarks; output is noise)",
    )


register_preset(simulated_preset())
