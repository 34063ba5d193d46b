"""The Ray executor: a step's units go to Denoiser replicas concurrently; dead replicas are retried.

A unit is a pure function of its inputs (latents slice, step index, rows, cache directive, request conditioning),
so retrying it on another replica cannot change the result: a replica that lacks the unit's step-cache residual
rebuilds it from the directive's anchor latents.

Unit ``i`` of a step is called as ``step(request_id, slot, [conditioning], unit)`` with ``slot = offset(request) +
i``: Serve's router places it on ``sorted(live replicas)[slot mod N]`` (:mod:`deployments.placement`), so a step is
spread evenly and each unit stays on its replica from step to step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

import ray
import torch
from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError

from deployments.placement import request_offset
from pipeline.denoise import WindowStep

logger = logging.getLogger("ray.serve")

RETRYABLE = (RayActorError, ReplicaUnavailableError)
RetryHook = Callable[[WindowStep, int, BaseException], Awaitable[None] | None]


def compact(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when it owns exactly its storage, else a contiguous copy of just its elements."""
    if tensor.is_contiguous() and tensor.storage_offset() == 0 and (
            tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()):
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def compact_unit(work: WindowStep) -> WindowStep:
    """A unit's latents (and anchor latents) are views into the whole latent tensor, and pickling a view writes
    its whole storage: without this a unit would carry all T frames to its replica instead of its window's."""
    cache = work.cache
    if cache is not None and cache.anchor_latents is not None:
        cache = dataclasses.replace(cache, anchor_latents=compact(cache.anchor_latents))
    return dataclasses.replace(work, latents=compact(work.latents), cache=cache)


class RayDenoiserExecutor:
    """``on_retry(work, attempt, error)`` (sync or async) runs before each retry: the Orchestrator logs it on the
    job, so a client sees which unit was re-run."""

    def __init__(self, denoiser_handle, conditioning_ref: ray.ObjectRef, request_id: str, retries: int,
                 on_retry: RetryHook | None = None):
        self.handle, self.ref, self.request_id = denoiser_handle, conditioning_ref, request_id
        self.retries, self.on_retry = retries, on_retry
        self.offset = request_offset(request_id)
        self.last_replicas: set[str] = set()  # replicas that served the last batch
        self.last_placement: list[str | None] = []  # the replica of each unit of the last batch
        self.units_per_replica: Counter[str] = Counter()  # over the whole run
        self.retried = 0  # units re-sent after their replica failed

    async def run(self, steps: Sequence[WindowStep]) -> list[torch.Tensor]:
        self.last_replicas, self.last_placement = set(), [None] * len(steps)
        return list(await asyncio.gather(*(self._run_one(index, work) for index, work in enumerate(steps))))

    async def _run_one(self, index: int, work: WindowStep) -> torch.Tensor:
        slot = self.offset + index
        work = compact_unit(work)
        for attempt in range(self.retries + 1):
            try:
                result = await self.handle.step.remote(self.request_id, slot, [self.ref], work)
            except RETRYABLE as exc:
                if attempt == self.retries:
                    raise
                self.retried += 1
                logger.warning("window %d step %d rows %s: replica failed (%s), retrying (%d/%d)", work.window,
                               work.step, work.rows, type(exc).__name__, attempt + 1, self.retries)
                if self.on_retry is not None:
                    outcome = self.on_retry(work, attempt + 1, exc)
                    if inspect.isawaitable(outcome):
                        await outcome
                continue
            if isinstance(result, tuple):  # (output, replica id) from the Denoiser deployment
                result, replica = result
                self.last_replicas.add(replica)
                self.last_placement[index] = replica
                self.units_per_replica[replica] += 1
            return result
        raise AssertionError("unreachable")

    async def release(self, max_replicas: int, timeout_s: float = 30.0) -> int:
        """Tell the replicas to drop this request's conditioning and residuals: one ``free`` per slot residue
        (``max_replicas`` slots reach every replica of any set of up to that many). Returns the residuals
        dropped; a replica that fails or does not answer within ``timeout_s`` is skipped (its LRU bounds what it
        keeps)."""
        calls = [asyncio.ensure_future(self._free(self.offset + i)) for i in range(max_replicas)]
        done, pending = await asyncio.wait(calls, timeout=timeout_s)
        for call in pending:
            call.cancel()
        return sum(call.result() for call in done if not call.cancelled() and call.exception() is None)

    async def _free(self, slot: int) -> int:
        return await self.handle.free.remote(self.request_id, slot)
