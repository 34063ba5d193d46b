"""Denoiser: runs units (one window at one step, some guidance rows) on its GPU; the GPU deployment.

Every method takes ``(request_id, key, ...)`` first: :class:`~deployments.workers.placement.StickyBalancedRouter` reads
them to place the call (a unit's :class:`~deployments.contracts.UnitKey`: balanced over the live replicas, the same
unit on the same replica from step to step; an ``int`` slot: a replica by rank).

One unit runs at a time per replica; the others wait inside the replica on its :class:`UnitQueue`, the unit of the
job with the least work left first (with ageing), so ``max_ongoing_requests`` is large (64: Serve's router never
has to hold a unit back) and a short job beside a long one is not held up by it. Each replica owns what sticky
placement keeps warm:

* the request's conditioning, published once into the object store (the Orchestrator passes its ``ObjectRef``
  wrapped in a list, so Ray does not resolve it on every call), cached for ``conditioning_cache_size`` requests
  (LRU);
* a :class:`~pipeline.step_cache.StepCache` (the residuals of the acceleration levels), bounded by
  ``pipeline.step_cache.max_entries`` / ``max_bytes`` (LRU).

``free(request_id, slot)`` drops both for a finished or cancelled request; the Orchestrator sends it to every rank,
and whatever a free misses (a replica that served the request before a scale event) ages out of the LRUs.

With ``denoiser.sp_degree`` n > 1 a replica owns n GPUs (a placement group of n bundles on one node): it is rank 0
of a parallel unit whose other ranks are actors it starts (:mod:`deployments.workers.rank_group`), and every unit
runs on all n ranks in lock-step, split by latent frames (``pipeline.sequence_parallel``). Everything above stays
the replica's own (queue, conditioning cache, stats); the step cache is rank 0's shard store. With ``sp_degree: 1``
none of it exists: no process group, no actors, the same forward as before.

A hung replica (a forward that never returns: a wedged GPU, a driver fault) is not a dead one: Serve would keep
routing to it. The Orchestrator cancels a unit after ``timeouts.unit_s`` and sends it to another replica; this
replica's health check then fails while a forward has run longer than that, so Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import OrderedDict
from pathlib import Path

import ray
import torch
from ray import serve
from ray.serve.config import RequestRouterConfig

from deployments.config import DENOISER_MAX_ONGOING, AppArgs
from deployments.contracts import UnitKey
from deployments.runtime import metrics
from deployments.runtime.replica import limit_heap_retention, replica_name
from deployments.workers.fault_hooks import claim_hook
from deployments.workers.models import load_replica_models
from deployments.workers.placement import StickyBalancedRouter
from deployments.workers.rank_group import RankGroup, RankInfo, rank_info
from deployments.workers.unit_queue import UnitQueue
from pipeline.denoise import RequestConditioning, WindowDenoiser, WindowStep
from pipeline.step_cache import AccelerationLevel, StepCache, StepCachePlan
from pipeline.to_the_end import to_the_end

# Test hooks (never set in production): a JSON file naming one unit {"step": s, "window": w}; the first replica that
# receives that unit claims the file and exits while holding it (the crash file), or hangs in its forward for
# "hang_s" seconds (the hang file), so a test's fault lands on a replica that holds work.
CRASH_FILE_ENV = "STABLE_AVATAR_TEST_CRASH_FILE"
HANG_FILE_ENV = "STABLE_AVATAR_TEST_HANG_FILE"
CRASH_DELAY_S = 2.0  # see _maybe_crash
UNITS_KEEP = 256  # requests whose unit counts a replica remembers (stats)


@serve.deployment(name="Denoiser", max_ongoing_requests=DENOISER_MAX_ONGOING,
                  request_router_config=RequestRouterConfig(request_router_class=StickyBalancedRouter))
class Denoiser:
    def __init__(self, args: AppArgs):
        limit_heap_retention()  # units and their outputs churn through window-sized buffers all job long
        bundle = load_replica_models(args, args.denoiser, ["transformer"])
        settings = args.pipeline
        self.placement = bundle.placement  # never released: the DiT stays placed between units
        self.step_cache_settings = settings.step_cache
        self.ranks: RankGroup | None = None  # sp_degree > 1: this replica's other ranks and its process group
        if args.denoiser.sp_degree == 1:
            self.denoiser = WindowDenoiser(bundle.transformer, compile=settings.compile)
            self.step_cache = StepCache.from_settings(settings.step_cache)
        else:
            self.ranks = RankGroup(args, bundle.transformer, args.torch_device(args.denoiser.num_gpus))
            self.denoiser, self.step_cache = self.ranks.rank.denoiser, self.ranks.rank.step_cache
        self.cache: OrderedDict[str, RequestConditioning] = OrderedDict()
        self.cache_size = args.conditioning_cache_size
        self._gpu = UnitQueue(args.unit_order, args.unit_ageing_s, args.unit_anticipation)
        self.units: OrderedDict[str, int] = OrderedDict()  # units run per request (bounded)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.unit_timeout_s = args.timeouts.unit_s
        self._forward_since: float | None = None  # time.monotonic() when the running forward started
        crash_file, hang_file = os.environ.get(CRASH_FILE_ENV), os.environ.get(HANG_FILE_ENV)
        self._crash_file = Path(crash_file) if crash_file else None
        self._hang_file = Path(hang_file) if hang_file else None

    def ready(self) -> dict:
        """Readiness: answering at all means the constructor, which loads the models, has finished. Says where
        the DiT lives (the memory mode)."""
        return {"deployment": "Denoiser", "replica": replica_name(), "memory": self.placement.describe()}

    async def check_health(self) -> None:
        """Serve's periodic health check (on the replica's event loop, which a forward in its thread leaves free):
        unhealthy while a forward has run longer than ``timeouts.unit_s``, so Serve replaces a hung replica."""
        since = self._forward_since
        if since is not None and time.monotonic() - since > self.unit_timeout_s:
            raise RuntimeError(f"a unit has been running for {time.monotonic() - since:.0f} s, over "
                               f"timeouts.unit_s ({self.unit_timeout_s:g} s): this replica is hung")
        if self.ranks is not None:
            await self.ranks.check()

    async def _conditioning(self, request_id: str, ref: ray.ObjectRef) -> RequestConditioning:
        if request_id in self.cache:
            self.cache.move_to_end(request_id)
            return self.cache[request_id]
        conditioning = await ref
        self.cache[request_id] = conditioning
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return conditioning

    async def step(self, request_id: str, key: UnitKey, conditioning: list[ray.ObjectRef],
                   unit: list[ray.ObjectRef]) -> tuple[torch.Tensor, str]:
        """Runs one unit (fetched from the object store now that this replica has accepted the call); returns its
        output and this replica's id (progress and tests see where units ran). ``key`` orders it in the queue."""
        work: WindowStep = await unit[0]
        await self._maybe_crash(work)
        cond = await self._conditioning(request_id, conditioning[0])
        async with self._gpu.hold(request_id, key.remaining, key.continues):
            # The forward runs in a thread so the replica stays responsive; if the request is cancelled while it
            # runs, keep the GPU until it has finished, so a cancelled job never overlaps the next unit.
            started = time.perf_counter()
            hang_s = (await asyncio.to_thread(claim_hook, self._hang_file, work)
                      if self._hang_file is not None else None)
            forward = asyncio.to_thread(self._forward, cond, work, hang_s)
            if self.ranks is not None:  # every rank runs the unit; rank 0 (this replica) returns it
                forward = self.ranks.lockstep(forward, request_id, conditioning, unit)
            self._forward_since = time.monotonic()
            try:
                result = await to_the_end(forward)
            finally:
                self._forward_since = None
        metrics.window_step_latency().observe(time.perf_counter() - started)
        self._count(request_id)
        return result, self.replica_id

    async def step_cache_plan(self, request_id: str, slot: int, num_steps: int,
                              level: AccelerationLevel) -> StepCachePlan | None:
        """The request's skip plan (any replica computes the same one: it depends on the schedule, the settings
        and the weights only)."""
        return await asyncio.to_thread(self.denoiser.step_cache_plan, num_steps, level, self.step_cache_settings)

    async def free(self, request_id: str, slot: int) -> int:
        """Drop a finished or cancelled request's conditioning and residuals; returns the residuals dropped.
        (Async, like ``stats``: it runs on the replica's event loop, where ``step`` uses the conditioning cache.)"""
        self.cache.pop(request_id, None)
        if self.ranks is not None:
            self.ranks.free(request_id)
        return self.step_cache.free(request_id)

    async def stats(self, request_id: str, slot: int) -> dict:
        """What this replica did: units run for ``request_id``, its step-cache counters and what it holds."""
        return {"replica": self.replica_id, "units": self.units.get(request_id, 0),
                "step_cache": self.step_cache.stats.as_dict(), "residuals": len(self.step_cache),
                "residual_bytes": self.step_cache.nbytes, "conditioning_cached": list(self.cache)}

    async def ranks_placement(self, request_id: str, slot: int) -> list[RankInfo]:
        """Where this replica's ranks run, rank 0 first (one rank with ``sp_degree: 1``)."""
        return self.ranks.ranks() if self.ranks is not None else [rank_info(0)]

    def _forward(self, cond: RequestConditioning, work: WindowStep, hang_s: float | None) -> torch.Tensor:
        if hang_s:  # test hook: a wedged forward
            time.sleep(hang_s)
        return self.denoiser(cond, work, self.step_cache)

    def _count(self, request_id: str) -> None:
        self.units[request_id] = self.units.pop(request_id, 0) + 1
        while len(self.units) > UNITS_KEEP:
            self.units.popitem(last=False)

    async def _maybe_crash(self, work: WindowStep) -> None:
        """Test hook: the replica running the unit named in the crash file exits while holding it. It waits
        ``CRASH_DELAY_S`` first: Serve's router re-sends by itself a request whose replica dies before its
        acceptance has reached the caller, so an immediate exit would sometimes test the router, not our retry."""
        if self._crash_file is not None and await asyncio.to_thread(claim_hook, self._crash_file, work):
            await asyncio.sleep(CRASH_DELAY_S)
            os._exit(1)
