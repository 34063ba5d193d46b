"""A stand-in DiT for fan-out benchmarks, registered as the ``simulated`` preset when this module is imported.

The service loads it through the app args' ``preset_modules: [bench.simulated]`` (imported in every replica), so
the runtime loader has no benchmark code in it. The DiT sleeps a fixed time per guidance row of the batch (0.5 s,
about one row-forward of the real 1.3B model at 480x832 on a datacenter GPU, so a batch-3 unit takes 1.5 s) and
returns a deterministic tensor: benchmarks of the fan-out measure scheduling, not arithmetic. It also offers the
step cache's interface (``timestep_modulation``, ``block_residual``): a reused residual skips the sleep.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from pipeline.presets import PRESETS, register_preset

SIMULATED_ROW_S = 0.5  # seconds per guidance row of a forward


class SimulatedTransformer(torch.nn.Module):
    """Same call signature as ``StableAvatarTransformer3DModel.forward``; no arithmetic worth measuring."""

    def __init__(self, row_s: float):
        super().__init__()
        self.row_s = row_s
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device and dtype

    def forward(self, latents: torch.Tensor, y: torch.Tensor, timestep: torch.Tensor, text_context: Sequence,
                clip_fea: torch.Tensor, audio_features: torch.Tensor | None, audio_rows: Sequence[bool],
                seq_len: int, return_dict: bool = True, block_residual=None,
                **_: object) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        # [B, 16, L, h, w]: a deterministic function of the inputs, so runs can be compared bit for bit.
        if block_residual is not None and block_residual.reuse is not None:
            residual = block_residual.reuse.to(latents.dtype)  # the blocks are skipped: no sleep
        else:
            time.sleep(self.row_s * latents.shape[0])
            residual = (timestep.view(-1, 1, 1, 1, 1) / 1000).to(latents.dtype).expand_as(latents).clone()
            if block_residual is not None:
                block_residual.computed = residual
        output = latents * 0.5 + residual
        return (output,) if not return_dict else Transformer2DModelOutput(sample=output)

    def timestep_modulation(self, timesteps: torch.Tensor) -> torch.Tensor:
        """A stand-in ``e0`` ``[N, 6, 4]`` that moves with the timestep (1-3 % per step early on)."""
        return (1.0 + timesteps.float().view(-1, 1, 1) / 1000).expand(-1, 6, 4).clone()

    def to_inference_dtype(self, dtype: torch.dtype) -> SimulatedTransformer:
        return self.to(dtype)


def simulated_preset(row_s: float = SIMULATED_ROW_S, name: str = "simulated"):
    """The tiny preset whose DiT is a :class:`SimulatedTransformer` sleeping ``row_s`` per guidance row."""
    return dataclasses.replace(
        PRESETS["tiny"], name=name, transformer_factory=functools.partial(SimulatedTransformer, row_s),
        description=f"tiny preset whose DiT sleeps {row_s} s per guidance row (benchmarks; output is noise)",
    )


register_preset(simulated_preset())
register_preset(simulated_preset(0.2, "simulated-fast"))  # tests of placement and fairness
register_preset(simulated_preset(0.0, "simulated-instant"))  # dispatcher throughput (bench/bench_jobs.py)
