"""The rank-side object of a parallel unit: holds the DiT, runs units in lock-step with its peer ranks.

A parallel unit is ``sp_degree`` ranks (processes, one device each) sharing one process group. The host (a Ray
Serve Denoiser replica and its rank actors, or :func:`pipeline.sequence_parallel.local.run_local_ranks`) gives
every rank the **same calls in the same order**: ``run(cond, work)`` for each unit, ``free(request_id)`` when a
request ends. Each rank computes its frames of the forward; collectives keep them in step; every rank ends with
the unit's output, and rank 0's ``run`` returns it (the others return ``None``). The unit is the same
``WindowStep`` as on one device: batch-3 CFG forward + guidance + Euler step, a split guidance row, or a
step-cache directive (compute and keep, reuse, rebuild from anchor latents), through the same ``WindowDenoiser``.

``sp_degree: 1`` (no group) runs the plain model through ``WindowDenoiser``: today's code path, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from pipeline.denoise import RequestConditioning, WindowDenoiser, WindowStep
from pipeline.presets import ModelPreset, TransformerVariant
from pipeline.step_cache import AccelerationLevel, CacheKey, StepCache, StepCachePlan, StepCacheSettings

from .comm import SequenceGroup
from .split import AttentionKind
from .transformer import SequenceParallelTransformer

__all__ = ["AgreedStepCache", "SequenceParallelRank"]


@dataclass
class AgreedStepCache(StepCache):
    """A rank's residual store (its shards): a lookup is agreed with the peers, so that if any rank lacks the
    residual (evicted, cold) all of them rebuild it, and no rank runs a forward the others skip."""

    comm: SequenceGroup | None = None

    def get(self, key: CacheKey, step: int) -> torch.Tensor | None:
        residual = super().get(key, step)
        return residual if self.comm.all_true(residual is not None, "step_cache_agree") else None


class SequenceParallelRank:
    """Rank ``group.rank()`` of a parallel unit of ``group.size()`` ranks (``group=None``: one device).

    ``attention``: ``auto`` takes Ulysses where the heads divide evenly by the degree, ring otherwise.
    ``step_cache``: bounds of this rank's residual store (a residual here is a 1/degree shard).
    """

    def __init__(self, transformer: torch.nn.Module, group: dist.ProcessGroup | None = None,
                 device: torch.device | str = "cpu", *, attention: AttentionKind | Literal["auto"] = "auto",
                 compile: bool = False, step_cache: StepCacheSettings | None = None):
        settings = step_cache or StepCacheSettings()
        self.comm = SequenceGroup(group, device) if group is not None else None
        if self.degree == 1:
            self.denoiser = WindowDenoiser(transformer, compile=compile)
            self.step_cache = StepCache.from_settings(settings)
            return
        if compile:
            raise ValueError("compile is not supported with sp_degree > 1 (collectives inside compiled blocks "
                             "are untested); set compile: false")
        self.denoiser = WindowDenoiser(SequenceParallelTransformer(transformer, self.comm, attention))
        self.step_cache = AgreedStepCache(settings.max_entries, settings.max_bytes, comm=self.comm)

    @classmethod
    def from_preset(cls, preset: ModelPreset, group: dist.ProcessGroup | None, device: torch.device | str,
                    *, checkpoints: Path | None = None, variant: TransformerVariant = "square",
                    dtype_policy: Literal["auto", "gpu", "fp32"] = "auto",
                    attention: AttentionKind | Literal["auto"] = "auto",
                    step_cache: StepCacheSettings | None = None) -> SequenceParallelRank:
        """Load the preset's DiT onto ``device`` (every rank holds all the weights) and wrap it."""
        from pipeline.loading import load_models

        bundle = load_models(preset, ["transformer"], checkpoints=checkpoints, device=device, variant=variant,
                             dtype_policy=dtype_policy)
        return cls(bundle.transformer, group, device, attention=attention, step_cache=step_cache)

    @property
    def rank(self) -> int:
        return self.comm.rank if self.comm is not None else 0

    @property
    def degree(self) -> int:
        return self.comm.degree if self.comm is not None else 1

    def run(self, cond: RequestConditioning, work: WindowStep) -> torch.Tensor | None:
        """Run one unit with the peer ranks; rank 0 returns the output (as ``WindowDenoiser`` does), the others
        ``None``."""
        output = self.denoiser(cond, work, self.step_cache)
        return output if self.rank == 0 else None

    def step_cache_plan(self, num_steps: int, level: AccelerationLevel,
                        settings: StepCacheSettings) -> StepCachePlan | None:
        """The request's skip plan; local (schedule and weights only): any single rank may answer it."""
        return self.denoiser.step_cache_plan(num_steps, level, settings)

    def free(self, request_id: str) -> int:
        """Drop a request's residual shards; send it to every rank (no communication)."""
        return self.step_cache.free(request_id)
