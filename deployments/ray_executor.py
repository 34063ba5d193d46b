"""The Ray executor: a step's K window-steps go to Denoiser replicas concurrently; dead replicas are retried.

A window-step is a pure function of its inputs (latents slice, step index, request conditioning), so retrying it on
another replica cannot change the result.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence

import ray
import torch
from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError

from pipeline.denoise import WindowStep

logger = logging.getLogger("ray.serve")

RETRYABLE = (RayActorError, ReplicaUnavailableError)
RetryHook = Callable[[WindowStep, int, BaseException], Awaitable[None] | None]


class RayDenoiserExecutor:
    """``on_retry(work, attempt, error)`` (sync or async) runs before each retry: the Orchestrator logs it on the
    job, so a client sees which window-step was re-run."""

    def __init__(self, denoiser_handle, conditioning_ref: ray.ObjectRef, request_id: str, retries: int,
                 on_retry: RetryHook | None = None):
        self.handle, self.ref, self.request_id = denoiser_handle, conditioning_ref, request_id
        self.retries, self.on_retry = retries, on_retry
        self.last_replicas: set[str] = set()  # replicas that served the last batch

    async def run(self, steps: Sequence[WindowStep]) -> list[torch.Tensor]:
        self.last_replicas = set()
        return list(await asyncio.gather(*(self._run_one(work) for work in steps)))

    async def _run_one(self, work: WindowStep) -> torch.Tensor:
        for attempt in range(self.retries + 1):
            try:
                result = await self.handle.step.remote([self.ref], self.request_id, work)
            except RETRYABLE as exc:
                if attempt == self.retries:
                    raise
                logger.warning("window %d step %d: replica failed (%s), retrying (%d/%d)",
                               work.window, work.step, type(exc).__name__, attempt + 1, self.retries)
                if self.on_retry is not None:
                    outcome = self.on_retry(work, attempt + 1, exc)
                    if inspect.isawaitable(outcome):
                        await outcome
                continue
            if isinstance(result, tuple):  # (latents, replica id) from the Denoiser deployment
                result, replica = result
                self.last_replicas.add(replica)
            return result
        raise AssertionError("unreachable")
