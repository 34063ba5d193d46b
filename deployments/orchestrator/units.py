"""What the Orchestrator asks of ``denoise`` for one request: its units (split guidance rows or batch 3), its
step-cache plan, and the steps after which a latent checkpoint may be taken.

The same settings (``AppArgs.pipeline``) reach ``stable-avatar generate`` through ``StableAvatarPipeline``, which is
why the service's video equals the CLI's for every setting.

Checkpoints and the step cache: resuming at a step that reuses a residual needs the latents of that residual's
anchor step, which a checkpoint of the fused latents alone does not hold. Instead of storing them too, a checkpoint
is taken only after a step whose successor is computed (at most a few steps later than ``every`` asks), so a
resumed run always starts on a computed step and needs nothing else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from deployments.contracts import UnitKey
from pipeline.denoise import GuidanceScales, RequestConditioning, WindowStep
from pipeline.settings import PipelineSettings
from pipeline.step_cache import AccelerationLevel, StepCachePlan


@dataclass(frozen=True)
class UnitPlan:
    """The request's unit settings, as keyword arguments of ``denoise``."""

    level: AccelerationLevel = "none"
    split_guidance: GuidanceScales | None = None
    step_cache: StepCachePlan | None = None

    def denoise_kwargs(self) -> dict:
        return {"split_guidance": self.split_guidance, "step_cache": self.step_cache}

    def checkpoint_due(self, step: int, num_steps: int, every: int, last_saved: int) -> bool:
        """Whether to checkpoint after ``step`` (0-based), the last one having been after ``last_saved`` (-1:
        none): ``every`` steps on, and deferred while the next step would reuse a residual."""
        if not every or step + 1 >= num_steps or step - last_saved < every:
            return False
        return self.step_cache is None or self.step_cache.compute[step + 1]

    def describe(self) -> str:
        rows = "guidance rows as separate units" if self.split_guidance else "batch-3 units"
        if self.step_cache is None:
            return f"{rows}, acceleration {self.level}"
        plan = self.step_cache
        return (f"{rows}, acceleration {self.level}: {plan.computed_steps} of {plan.num_steps} steps computed, "
                f"{plan.num_steps - plan.computed_steps} reuse a residual")


def unit_plan(settings: PipelineSettings, conditioning: RequestConditioning, level: AccelerationLevel,
              step_cache: StepCachePlan | None, start_step: int = 0) -> UnitPlan:
    """The plan of a request. ``start_step``: a resumed run; if its first step would reuse a residual (a checkpoint
    written under other settings), that step is computed instead, since its anchor latents are not kept."""
    split = GuidanceScales(conditioning.text_scale, conditioning.audio_scale) if settings.split_guidance_rows else None
    if step_cache is not None and start_step < step_cache.num_steps and not step_cache.compute[start_step]:
        compute = list(step_cache.compute)
        compute[start_step] = True
        step_cache = dataclasses.replace(step_cache, compute=tuple(compute))
    return UnitPlan(level, split, step_cache)


def unit_keys(steps: Sequence[WindowStep], num_steps: int | None) -> list[UnitKey]:
    """The routing keys of a step's units (:class:`UnitKey`): unit ``i`` of ``len(steps)``, and the job's remaining
    work in guidance rows, this step's included, as if every later step ran the same rows (a step the step cache
    skips costs less: an overestimate). ``num_steps`` None: unknown, counted as this step alone."""
    rows = sum(len(work.rows) for work in steps)
    step = steps[0].step if steps else 0
    left = max(1, num_steps - step) if num_steps is not None else 1
    return [UnitKey(index=i, units=len(steps), remaining=rows * left, continues=left > 1)
            for i in range(len(steps))]
