"""Denoiser: one window, one step per call (batch-3 CFG forward + Euler step); the GPU deployment.

One window-step runs at a time per replica (an asyncio lock around the GPU work); ``max_ongoing_requests`` 2 lets
the next one wait inside the replica rather than in the router's retry back-off. Conditioning is published once per
request into the object store; the Orchestrator passes its ``ObjectRef``
wrapped in a list (so Ray does not resolve it on every call) and the replica caches the value per request.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

import ray
import torch
from ray import serve

from deployments import metrics
from deployments.common import load_replica_models, replica_name
from deployments.config import AppArgs
from pipeline.denoise import RequestConditioning, WindowDenoiser, WindowStep


@serve.deployment(name="Denoiser", max_ongoing_requests=2)
class Denoiser:
    def __init__(self, args: AppArgs):
        bundle = load_replica_models(args, args.denoiser, ["transformer"])
        self.denoiser = WindowDenoiser(bundle.transformer)
        self.cache: OrderedDict[str, RequestConditioning] = OrderedDict()
        self.cache_size = args.conditioning_cache_size
        self._gpu = asyncio.Lock()
        self.replica_id = serve.get_replica_context().replica_tag

    def ready(self) -> dict:
        """Readiness: answering at all means the constructor, which loads the models, has finished."""
        return {"deployment": "Denoiser", "replica": replica_name()}

    async def _conditioning(self, request_id: str, ref: ray.ObjectRef) -> RequestConditioning:
        if request_id in self.cache:
            self.cache.move_to_end(request_id)
            return self.cache[request_id]
        conditioning = await ref
        self.cache[request_id] = conditioning
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return conditioning

    async def step(self, conditioning: list[ray.ObjectRef], request_id: str,
                   work: WindowStep) -> tuple[torch.Tensor, str]:
        """Returns the window's post-step latents and this replica's id (for progress reporting)."""
        cond = await self._conditioning(request_id, conditioning[0])
        async with self._gpu:
            # The forward runs in a thread so the replica stays responsive; if the request is cancelled while it
            # runs, keep the lock until it has finished, so a cancelled job never overlaps the next one on the GPU.
            started = time.perf_counter()
            task = asyncio.ensure_future(asyncio.to_thread(self.denoiser, cond, work))
            try:
                result = await asyncio.shield(task)
            except asyncio.CancelledError:
                await asyncio.wait([task])
                raise
        metrics.window_step_latency().observe(time.perf_counter() - started)
        return result, self.replica_id
