"""The denoising loop, written once against a small executor interface.

Per step, every window is denoised from the previous step's latents (Jacobi: windows of a step are independent),
then the overlaps are fused. Executors decide where and in which order units run: in this process
(``InProcessExecutor``) or on Ray Serve Denoiser replicas. The loop only sees "run these units, give me their
outputs", so the result is bit-identical whatever the order, placement or replica count.

A unit (``WindowStep``) is one window at one step, for some of its three guidance rows:

* ``rows == ALL_ROWS`` (default): one batch-3 CFG forward, the guidance combination and the Euler step on the
  runner's device; the unit returns the window's post-step latents.
* one row (``split_guidance`` in ``denoise``): the unit returns that row's noise prediction, and the loop combines
  the three rows of a window with ``schedule.guided_step``. A step of K windows is then 3·K units that can run on
  3·K replicas. Deterministic and order-free like batch 3, but not bit-equal to it: a batch-1 forward rounds
  differently from batch 3 (``bench/results/split_rows.txt``, tiny preset, CPU: fp32 predictions 1.2e-6 apart,
  which flip ~0.1 % of the bf16-rounded fused latents by one bf16 ulp; bf16 predictions one ulp apart, final latents
  up to 1.8 % of their range). Real-size bf16 numbers: ``bench/bench_gpu.py`` (``split_rows``).

A unit may also carry a ``CacheDirective`` (``pipeline.step_cache``): run the blocks, or reuse its own last residual.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from pipeline.models.block_residual import BlockResidual
from pipeline.models.devices import compute_device
from pipeline.raw_tensor import RawTensor
from pipeline.schedule import SigmaSchedule, guided_step, sigma_schedule
from pipeline.step_cache import (
    ALL_ROWS,
    AccelerationLevel,
    CacheDirective,
    StepCache,
    StepCachePlan,
    StepCacheSettings,
    plan_for,
)
from pipeline.windows import StreamingFusion, WeightScheme, Window, WindowPlan

CFG_AUDIO_ROWS = (False, True, True)  # rows: [neg text + null audio, neg text + audio, pos text + audio]
SPLIT_ROWS: tuple[tuple[int, ...], ...] = ((0,), (1,), (2,))


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
class GuidanceScales:
    """The CFG scales the denoise loop needs to combine split guidance rows itself."""

    text_scale: float
    audio_scale: float


@dataclass(frozen=True)
class WindowStep:
    """One unit of work: window ``window`` at denoising step ``step``, starting from ``latents``.

    ``rows``: the guidance rows it computes (``ALL_ROWS``: the whole window-step, output = post-step latents;
    otherwise output = those rows' noise predictions ``[len(rows), 16, L, h, w]`` in the state dtype).
    ``cache``: the step-cache directive (``None``: no step cache, the plain forward).

    ``latents`` (and the directive's ``anchor_latents``) are usually views into the whole latent [1, 16, T, h, w],
    and pickling a torch view writes its whole storage: a unit sent to a Denoiser replica would carry all T frames
    (1.4 GiB at 600 s and 480x832 instead of 8 MiB). A unit pickles a compact copy of its own frames instead, as a
    :class:`~pipeline.raw_tensor.RawTensor`: out of band under pickle protocol 5 (Ray's), so the copy exists only
    while it is written into the object store, and the sender keeps just the view (which a retry resends). The
    receiver's tensors are then read-only, which a unit never needs to change.
    """

    window: int
    step: int
    latents: torch.Tensor  # [1, 16, L, h, w] in the state dtype
    rows: tuple[int, ...] = ALL_ROWS
    cache: CacheDirective | None = None

    def __reduce__(self):
        cache, anchor = self.cache, None
        if cache is not None and cache.anchor_latents is not None:
            cache, anchor = dataclasses.replace(cache, anchor_latents=None), RawTensor(cache.anchor_latents)
        return _unpickle_unit, (self.window, self.step, RawTensor(self.latents), self.rows, cache, anchor)


def _unpickle_unit(window: int, step: int, latents: RawTensor, rows: tuple[int, ...], cache: CacheDirective | None,
                   anchor: RawTensor | None) -> WindowStep:
    if anchor is not None:
        cache = dataclasses.replace(cache, anchor_latents=anchor.tensor())
    return WindowStep(window, step, latents.tensor(), rows, cache)


class ResidualMissingError(RuntimeError):
    """A unit was told to reuse a residual that this runner does not hold, and carried no anchor latents."""


class WindowDenoiser:
    """Runs units: one window, one step, some guidance rows; optionally through a step cache."""

    def __init__(self, transformer: torch.nn.Module, compile: bool = False):
        self.transformer = transformer
        if compile:
            from pipeline.compile import compile_dit

            compile_dit(transformer)
        self._plans: dict[tuple, StepCachePlan] = {}

    def step_cache_plan(self, num_steps: int, level: AccelerationLevel,
                        settings: StepCacheSettings) -> StepCachePlan | None:
        """The request's skip plan for ``level`` (``None`` for ``"none"``): depends only on the schedule, the
        settings and the weights, so it is made once (memoised) and carried by the units."""
        if level == "none":
            return None
        memo = (num_steps, level, settings.model_dump_json())
        if memo not in self._plans:
            if len(self._plans) >= 64:
                self._plans.pop(next(iter(self._plans)))
            modulation = self.transformer.timestep_modulation(sigma_schedule(num_steps).timesteps)  # [N, 6, C]
            self._plans[memo] = plan_for(settings, modulation, level)
        return self._plans[memo]

    def model_inputs(self, cond: RequestConditioning, window: int, step: int, latents: torch.Tensor,
                     rows: tuple[int, ...]) -> dict:
        """The DiT's keyword arguments for ``rows`` of one window at one step (rows batched in the given order)."""
        device, dtype, batch = compute_device(self.transformer), next(self.transformer.parameters()).dtype, len(rows)
        length = latents.shape[2]
        negative, positive = cond.text_negative.to(device, dtype), cond.text_positive.to(device, dtype)
        texts = (negative, negative, positive)
        return dict(
            latents=latents.to(device, dtype).repeat(batch, 1, 1, 1, 1),  # [B, 16, L, h, w]
            y=cond.y[:, :, :length].to(device, dtype).repeat(batch, 1, 1, 1, 1),  # [B, 20, L, h, w]
            timestep=cond.schedule.timesteps[step].expand(batch).to(device),  # [B] float, sigma·1000
            text_context=[texts[r] for r in rows],
            clip_fea=cond.clip_context.to(device, dtype).repeat(batch, 1, 1),  # [B, 257, image_dim]
            audio_features=cond.audio_features[window].to(device, dtype),  # [1, N, audio_dim]
            audio_rows=tuple(CFG_AUDIO_ROWS[r] for r in rows),
            seq_len=cond.seq_len,
        )

    @torch.no_grad()
    def __call__(self, cond: RequestConditioning, work: WindowStep,
                 step_cache: StepCache | None = None) -> torch.Tensor:
        latents = work.latents  # [1, 16, L, h, w]
        if not work.rows or any(r not in ALL_ROWS for r in work.rows) or len(set(work.rows)) != len(work.rows):
            raise ValueError(f"rows must be distinct guidance rows out of {ALL_ROWS}, got {work.rows}")
        inputs = self.model_inputs(cond, work.window, work.step, latents, work.rows)
        if work.cache is None:
            (noise_pred,) = self.transformer(**inputs, return_dict=False)  # [B, 16, L, h, w]
        else:
            noise_pred = self._cached_forward(cond, work, inputs, step_cache)
        if work.rows == ALL_ROWS:
            device = inputs["latents"].device
            stepped = guided_step(noise_pred, latents.to(device), cond.schedule, work.step, cond.audio_scale,
                                  cond.text_scale)
            return stepped.cpu()  # [1, 16, L, h, w] in the state dtype
        return noise_pred.to(latents.dtype).cpu()  # [len(rows), 16, L, h, w] in the state dtype

    def _cached_forward(self, cond: RequestConditioning, work: WindowStep, inputs: dict,
                        step_cache: StepCache | None) -> torch.Tensor:
        """The forward under the unit's directive. The key is the unit's own: (request, window, rows)."""
        if step_cache is None:
            raise ValueError("a unit with a step-cache directive needs the runner's StepCache")
        directive, stats, rows = work.cache, step_cache.stats, len(work.rows)
        key = (cond.request_id, work.window, work.rows)
        if directive.reuse_from is None:
            slot = BlockResidual()
            (noise_pred,) = self.transformer(**inputs, return_dict=False, block_residual=slot)
            stats.computed += 1
            stats.row_forwards_computed += rows
            if directive.keep and work.step + 1 < cond.num_steps:
                step_cache.put(key, work.step, slot.computed)
            else:
                step_cache.discard(key)
            return noise_pred

        residual = step_cache.get(key, directive.reuse_from)
        if residual is None:
            if directive.anchor_latents is None:
                raise ResidualMissingError(
                    f"request {cond.request_id} window {work.window} rows {work.rows}: no residual of step "
                    f"{directive.reuse_from} here and no anchor latents to rebuild it")
            anchor = self.model_inputs(cond, work.window, directive.reuse_from, directive.anchor_latents,
                                       work.rows)
            slot = BlockResidual()
            self.transformer(**anchor, return_dict=False, block_residual=slot)
            residual = slot.computed
            step_cache.put(key, directive.reuse_from, residual)
            stats.rebuilt += 1
            stats.row_forwards_computed += rows
        else:
            stats.reused += 1
        stats.row_forwards_skipped += rows
        (noise_pred,) = self.transformer(**inputs, return_dict=False, block_residual=BlockResidual(reuse=residual))
        if work.step + 1 >= cond.num_steps:
            step_cache.discard(key)
        return noise_pred


class WindowStepExecutor(Protocol):
    """Runs a batch of units (any order, anywhere) and returns their outputs in the order given.

    An executor may also offer ``as_completed(steps)``: an async iterator of ``(position, output)`` as each unit
    finishes (leaving it early cancels the units still running), which lets the loop fuse outputs as they come
    instead of holding all of them (:func:`completed`).
    """

    async def run(self, steps: Sequence[WindowStep]) -> list[torch.Tensor]: ...


async def in_order(stream: AsyncIterator[tuple[int, torch.Tensor]], count: int) -> list[torch.Tensor]:
    """The ``count`` outputs of an ``as_completed`` stream, by position: ``run`` for a streaming executor."""
    outputs: list[torch.Tensor | None] = [None] * count
    async with contextlib.aclosing(stream) as results:
        async for position, output in results:
            outputs[position] = output
    return outputs  # type: ignore[return-value]


async def completed(executor: WindowStepExecutor,
                    steps: Sequence[WindowStep]) -> AsyncIterator[tuple[int, torch.Tensor]]:
    """``(position, output)`` pairs: streamed by executors with ``as_completed``, all at the end otherwise."""
    stream = getattr(executor, "as_completed", None)
    if stream is None:
        for item in enumerate(await executor.run(steps)):
            yield item
        return
    async with contextlib.aclosing(stream(steps)) as results:
        async for item in results:
            yield item


class InProcessExecutor:
    """Runs units one after another in this process; yields to the event loop between them. Owns the step cache
    of the units it runs (``free(request_id)`` when the request ends)."""

    def __init__(self, denoiser: WindowDenoiser, conditioning: RequestConditioning,
                 on_window_step: Callable[[WindowStep], None] | None = None,
                 step_cache: StepCache | None = None):
        self.denoiser, self.conditioning = denoiser, conditioning
        self.on_window_step = on_window_step
        self.step_cache = step_cache if step_cache is not None else StepCache()

    async def as_completed(self, steps: Sequence[WindowStep]) -> AsyncIterator[tuple[int, torch.Tensor]]:
        """Each unit's ``(position, output)`` as soon as it has run (in order: one at a time here)."""
        for position, work in enumerate(steps):
            output = self.denoiser(self.conditioning, work, self.step_cache)
            if self.on_window_step is not None:
                self.on_window_step(work)
            yield position, output
            await asyncio.sleep(0)  # cancellation point

    async def run(self, steps: Sequence[WindowStep]) -> list[torch.Tensor]:
        return await in_order(self.as_completed(steps), len(steps))


def initial_noise(seed: int, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The whole latent's noise, drawn once in bf16 from a CPU generator (as fal's fork and upstream app.py do),
    so windows share noise in their overlaps and the result does not depend on devices or replica count."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.bfloat16).to(dtype)


StepCallback = Callable[[int, torch.Tensor], Awaitable[None] | None]


def _directive(plan: StepCachePlan | None, step: int, anchor: torch.Tensor | None,
               window: Window) -> CacheDirective | None:
    if plan is None:
        return None
    return plan.directive(step, None if plan.compute[step] else anchor[:, :, window.start:window.end])


class _StepOutputs:
    """Turns a step's unit outputs, arriving in any order, into window outputs for :class:`StreamingFusion`:
    a batch-3 unit's output is its window's; split rows are combined by ``guided_step`` (against the previous
    state's slice) as soon as the window's three row outputs are in, so each window holds one output at most."""

    def __init__(self, fusion: StreamingFusion, previous: torch.Tensor, plan: WindowPlan, step: int,
                 schedule: SigmaSchedule, split_guidance: GuidanceScales | None):
        self.fusion, self.previous, self.plan, self.step = fusion, previous, plan, step
        self.schedule, self.split = schedule, split_guidance
        self.rows: dict[int, dict[int, torch.Tensor]] = {}  # split rows of windows still incomplete

    def add(self, position: int, output: torch.Tensor) -> None:
        if self.split is None:
            self.fusion.add(position, output)
            return
        k, row = divmod(position, len(SPLIT_ROWS))
        rows = self.rows.setdefault(k, {})
        if row in rows:
            raise ValueError(f"window {k} row {row}'s output arrived twice")
        rows[row] = output
        if len(rows) < len(SPLIT_ROWS):
            return
        del self.rows[k]
        w = self.plan.windows[k]
        stepped = guided_step(torch.cat([rows[r] for r in range(len(SPLIT_ROWS))]),
                              self.previous[:, :, w.start:w.end], self.schedule, self.step, self.split.audio_scale,
                              self.split.text_scale)
        self.fusion.add(k, stepped)


async def denoise(
    plan: WindowPlan,
    latents: torch.Tensor,
    num_steps: int,
    executor: WindowStepExecutor,
    weight_scheme: WeightScheme = "uniform",
    start_step: int = 0,
    on_step: StepCallback | None = None,
    *,
    split_guidance: GuidanceScales | None = None,
    step_cache: StepCachePlan | None = None,
    anchor_latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run steps ``start_step..num_steps-1`` over all windows; ``latents`` is [1, 16, T, h, w] (state dtype).

    ``on_step(step, latents)`` runs after each fused step (progress, checkpoints); starting from a checkpoint
    with ``start_step`` gives the same result as an uninterrupted run.

    ``split_guidance``: run each window-step as three row units and combine them here with these scales.
    ``step_cache``: the request's skip plan; units carry their directive, reusing units carry their window's
    latents at the anchor step. Resuming at a skipped step needs ``anchor_latents``: the latents that were the input
    of ``step_cache.anchor(start_step)`` (save ``latents`` after step ``s`` when ``step_cache.compute[s + 1]``).

    Memory: unit outputs are fused as they arrive (executors with ``as_completed``; :class:`StreamingFusion`), so
    a step holds the previous state, the new one, and only the window outputs that arrived ahead of their turn
    (none when they come in window order; with split rows, up to three row outputs per incomplete window), plus
    the step cache's anchor state while skipped steps follow a computed one. Units carry views of the previous
    state, never copies (:class:`WindowStep` pickles only its own frames).
    """
    schedule = sigma_schedule(num_steps)
    unit_rows = SPLIT_ROWS if split_guidance is not None else (ALL_ROWS,)
    anchor = anchor_latents
    if step_cache is not None:
        if step_cache.num_steps != num_steps:
            raise ValueError(f"step cache plan has {step_cache.num_steps} steps, the run has {num_steps}")
        if start_step < num_steps and not step_cache.compute[start_step] and anchor is None:
            raise ValueError(f"resuming at step {start_step}, which reuses step {step_cache.anchor(start_step)}"
                             "'s residual, needs that step's latents (anchor_latents)")
    for step in range(start_step, num_steps):
        if step_cache is not None and step_cache.compute[step]:
            anchor = latents  # the input of a computed step is the anchor of the skipped steps after it
        work = [
            WindowStep(w.index, step, latents[:, :, w.start:w.end], rows, _directive(step_cache, step, anchor, w))
            for w in plan.windows for rows in unit_rows
        ]
        fusion = StreamingFusion(latents, plan.windows, step, plan.overlap, weight_scheme)
        outputs = _StepOutputs(fusion, latents, plan, step, schedule, split_guidance)
        async with contextlib.aclosing(completed(executor, work)) as results:
            async for position, output in results:
                outputs.add(position, output)
        del work, outputs  # the units' views of the previous state
        latents = fusion.result()
        del fusion
        if on_step is not None:
            result = on_step(step, latents)
            if asyncio.iscoroutine(result):
                await result
    return latents
