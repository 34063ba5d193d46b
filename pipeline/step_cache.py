"""A TeaCache-style step cache for the DiT that is correct with sliding windows and split guidance rows.

TeaCache skips a forward when the timestep-modulated input barely changed since the last computed step and adds
that step's *residual* (the 30 blocks' output minus their input) to the current input instead. Upstream
StableAvatar's copy counts forward *calls* and keeps one residual per model, so with several windows per step it
adds one window's residual to another (reference ``stableavatar.md`` §5.2). Here the state belongs to one **unit**:
``(request, window, guidance rows)``, and the placement of units never changes the output.

The rule (what makes a cached run identical on 1 or N replicas, in any unit order, after a replica kill):

1. **The skip decisions are a plan made once per request from the schedule alone** (``plan_step_cache``). For Wan
   the modulated input ``e0`` depends only on the timestep (and the weights), so every window and row of a request
   gets the same decisions; no unit's data enters them. The plan travels in the units (``CacheDirective``).
2. **A skipped step reuses the residual of the same unit's last computed step** (its *anchor*), never another
   unit's: the store is keyed by ``(request_id, window, rows)``.
3. **A missing residual is rebuilt, not replaced by a fresh compute.** A unit that reuses carries its window's
   latents at the anchor step; if the residual is not in this runner's ``StepCache`` (another replica computed the
   anchor, the replica restarted, the entry was evicted) the runner recomputes the anchor step's residual from them
   (one extra forward) and continues exactly as a warm cache would. So a cold cache costs time, never bits.

TeaCache's own constants, as used here (``TeaCache4Wan2.1`` with ``use_ret_steps``, which StableAvatar adopted):

- the modulated input is ``e0`` (``time_projection`` output), not ``e``: ali-vilab/TeaCache
  ``TeaCache4Wan2.1/teacache_generate.py`` @ 7c10efc (last change 8ae3503), ``teacache_forward``:
  ``modulated_inp = e0 if self.use_ref_steps else e``; same in Francis-Rings/StableAvatar
  ``wan/models/wan_fantasy_transformer3d_1B.py`` @ 46c0492 (``modulated_inp = e0``);
- the distance is ``mean|e0_i - e0_{i-1}| / mean|e0_{i-1}|`` between consecutive steps, rescaled by the polynomial
  below, accumulated since the last computed step, and a step is computed (and the sum reset) once the sum reaches
  the threshold: same file, lines ``accumulated_rel_l1_distance_even += rescale_func(...)``;
- ``WAN21_1P3B_E0_COEFFICIENTS`` (Wan2.1 1.3B, ``e0``): same file, ``use_ret_steps`` branch, ``'1.3B' in ckpt_dir``;
  identical in Francis-Rings/StableAvatar ``wan/models/cache_utils.py`` @ 46c0492 (last change f8d6f8b),
  ``get_teacache_coefficients``;
- the first 5 steps always computed: TeaCache ``ret_steps = 5*2`` (5 steps of cond+uncond calls) in the same
  branch, and fal-ai-community/StableAvatar ``infer.py`` @ 20bb2ff: ``num_skip_start_steps: int = 5``;
- the last step always computed: StableAvatar's ``cnt == num_steps - 1`` in the forward above (TeaCache's
  ``use_ret_steps`` branch does not force it; the non-``ret_steps`` branch does, via ``cutoff_steps``).

Thresholds of the levels (``AccelerationLevel``): ``regular`` 0.05 and ``high`` 0.10, TeaCache's published "slow"
and "fast" thresholds for Wan2.1 t2v 1.3B with ``use_ret_steps`` (``TeaCache4Wan2.1/README.md`` @ 7c10efc: 97 s ->
61 s at 0.05 and -> 41 s at 0.10 on an A800); 0.10 is also fal's StableAvatar default (``infer.py`` @ 20bb2ff:
``teacache_threshold: float = 0.10``).

Two deviations, both towards computing more, never less:

- a threshold of 0 computes every step (the polynomial is negative below a distance of 0.0043, so TeaCache could
  still skip at 0);
- ``guard_fitted_range`` (on by default): a step whose raw distance lies beyond the polynomial's first local
  maximum (0.0792 for the coefficients above) is computed. Past it the fitted quartic falls, and past 0.1019 it is
  negative (-217 at 0.3), so unguarded TeaCache would skip *more* the more the input changes. The real model's
  steps are expected inside the fitted range; the ``tiny`` preset's random time embedder moves e0 by 0.2-0.5 per
  step, so there the guard computes every step (the bench shows both).

Memory: a residual is ``[rows, seq_len, 1536]`` in the DiT dtype: 32 760 x 1536 x 2 B = 100.6 MB per row of a full
480x832 window in bf16 (65.5 MB at 512x512). Only units inside a run of skipped steps hold one (the plan says
which computed steps must ``keep`` theirs), the last step of a unit frees it, ``free(request_id)`` drops a request's
entries, and ``StepCache`` evicts least-recently-used entries beyond ``max_entries`` / ``max_bytes`` (default 8 GiB:
80 row-residuals at 480x832). During a skip run one runner holding a whole request needs windows x 3 rows of them
(5 s: 2 windows, 0.6 GB; 60 s at overlap 10: 34 windows, 10.3 GB): past the bound an evicted residual is rebuilt
(one extra forward), so size ``max_bytes`` to the clips that should be accelerated; replicas each hold their share.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.schema import AccelerationLevel
from pipeline.settings import WAN21_1P3B_E0_COEFFICIENTS, StepCacheSettings

ALL_ROWS: tuple[int, ...] = (0, 1, 2)


def plan_for(settings: StepCacheSettings, modulation: torch.Tensor, level: AccelerationLevel) -> StepCachePlan:
    """The plan of ``level`` under ``settings`` for a schedule whose per-step modulated inputs are ``modulation``."""
    limit = fitted_range_limit(settings.coefficients) if settings.guard_fitted_range else None
    return plan_step_cache(modulation, settings.threshold(level), settings.always_compute_first,
                           settings.coefficients, limit)


@dataclass(frozen=True)
class CacheDirective:
    """What a unit does with its step cache at its step (from the request's ``StepCachePlan``).

    ``reuse_from`` None: run the blocks; then keep the residual if ``keep``. Otherwise: add the residual of step
    ``reuse_from`` of this same unit, rebuilt from ``anchor_latents`` (the window's latents at that step) when this
    runner does not hold it.
    """

    reuse_from: int | None = None
    keep: bool = False
    anchor_latents: torch.Tensor | None = None  # [1, 16, L, h, w] state dtype; only with reuse_from


@dataclass(frozen=True)
class StepCachePlan:
    """Per step: computed (True) or skipped with the last computed step's residual (False)."""

    compute: tuple[bool, ...]

    def __post_init__(self) -> None:
        if not self.compute or not self.compute[0]:
            raise ValueError("a step cache plan must compute its first step")

    @property
    def num_steps(self) -> int:
        return len(self.compute)

    @property
    def computed_steps(self) -> int:
        return sum(self.compute)

    def anchor(self, step: int) -> int:
        """The last computed step at or before ``step`` (whose residual a skipped ``step`` reuses)."""
        return next(s for s in range(step, -1, -1) if self.compute[s])

    def keeps(self, step: int) -> bool:
        """A computed step keeps its residual when the next step reuses it."""
        return self.compute[step] and step + 1 < self.num_steps and not self.compute[step + 1]

    def directive(self, step: int, anchor_latents: torch.Tensor | None) -> CacheDirective:
        if self.compute[step]:
            return CacheDirective(keep=self.keeps(step))
        return CacheDirective(reuse_from=self.anchor(step), anchor_latents=anchor_latents)


def rescale(distance: float, coefficients: Sequence[float]) -> float:
    """The polynomial ``c0·x^n + ... + cn`` (numpy ``poly1d`` order), by Horner's rule in float64."""
    value = 0.0
    for coefficient in coefficients:
        value = value * distance + coefficient
    return value


def fitted_range_limit(coefficients: Sequence[float]) -> float | None:
    """The polynomial's first local maximum at a positive distance (where its rescaling stops growing with the
    distance), or ``None`` if it has none."""
    poly = np.poly1d(np.asarray(coefficients, dtype=np.float64))
    slope, curvature = poly.deriv(), poly.deriv(2)
    maxima = [float(r.real) for r in slope.roots if abs(r.imag) < 1e-12 and r.real > 0 and curvature(r.real) < 0]
    return min(maxima) if maxima else None


def plan_step_cache(modulation: torch.Tensor, threshold: float, always_compute_first: int,
                    coefficients: Sequence[float] = WAN21_1P3B_E0_COEFFICIENTS,
                    max_distance: float | None = None) -> StepCachePlan:
    """TeaCache's skip rule over a request's steps. ``modulation``: ``[N, ...]`` the modulated input per step
    (``e0`` for Wan), for the N steps of the schedule. ``max_distance``: a step moving further is computed (the
    fitted-range guard). A pure function of its inputs: every runner agrees."""
    values = modulation.detach().to("cpu", torch.float64).flatten(1)  # [N, 6C]
    num_steps = values.shape[0]
    compute, accumulated = [], 0.0
    for step in range(num_steps):
        if step < always_compute_first or step == num_steps - 1:
            compute.append(True)
            accumulated = 0.0
            continue
        previous = values[step - 1]
        distance = float((values[step] - previous).abs().mean() / previous.abs().mean())
        accumulated += rescale(distance, coefficients)
        beyond_fit = max_distance is not None and distance > max_distance
        if threshold > 0 and accumulated < threshold and not beyond_fit:
            compute.append(False)
        else:
            compute.append(True)
            accumulated = 0.0
    return StepCachePlan(tuple(compute))


CacheKey = tuple[str, int, tuple[int, ...]]  # (request_id, window, rows)


@dataclass
class StepCacheStats:
    """Counters of one runner (forwards are unit forwards; multiply by the unit's rows for row-forwards)."""

    computed: int = 0  # blocks ran (cache-directed units only)
    reused: int = 0  # blocks skipped, residual found here
    rebuilt: int = 0  # residual was missing (cold runner, eviction): anchor step recomputed, then reused
    evicted: int = 0  # entries dropped by the LRU bound
    row_forwards_computed: int = 0
    row_forwards_skipped: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class _Entry:
    step: int
    residual: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.residual.numel() * self.residual.element_size()


@dataclass
class StepCache:
    """The residual store of one runner (the in-process executor, or one Denoiser replica): bounded LRU."""

    max_entries: int = 256
    max_bytes: int = 8 << 30
    stats: StepCacheStats = field(default_factory=StepCacheStats)

    def __post_init__(self) -> None:
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: StepCacheSettings) -> StepCache:
        return cls(max_entries=settings.max_entries, max_bytes=settings.max_bytes)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey, step: int) -> torch.Tensor | None:
        """The residual that ``key`` computed at ``step``, if this runner holds it."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.step != step:
                return None
            self._entries.move_to_end(key)
            return entry.residual

    def put(self, key: CacheKey, step: int, residual: torch.Tensor) -> None:
        with self._lock:
            self._drop(key)
            entry = _Entry(step, residual)
            self._entries[key] = entry
            self._bytes += entry.nbytes
            while len(self._entries) > self.max_entries or (self._bytes > self.max_bytes and len(self._entries) > 1):
                oldest = next(iter(self._entries))
                self._drop(oldest)
                self.stats.evicted += 1
            if self._bytes > self.max_bytes:  # a single residual larger than the whole budget is not kept
                self._drop(key)
                self.stats.evicted += 1

    def discard(self, key: CacheKey) -> None:
        with self._lock:
            self._drop(key)

    def free(self, request_id: str) -> int:
        """Drop every entry of a finished or cancelled request; returns how many there were."""
        with self._lock:
            keys = [key for key in self._entries if key[0] == request_id]
            for key in keys:
                self._drop(key)
            return len(keys)

    def _drop(self, key: CacheKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.nbytes
