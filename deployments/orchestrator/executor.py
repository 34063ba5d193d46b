"""The Ray executor: a step's units go to Denoiser replicas concurrently; dead replicas are retried.

A unit is a pure function of its inputs (latents slice, step index, rows, cache directive, request conditioning),
so retrying it on another replica cannot change the result: a replica that lacks the unit's step-cache residual
rebuilds it from the directive's anchor latents. A unit whose replica died is sent again with the same key (the dead
replica has left the set, so the placement picks another); one that overran ``unit_timeout_s`` (a hung replica,
which is still in the set) is cancelled and sent one replica further (``UnitKey.detour``), and a unit that overran on every try ends the attempt
(``UnitTimeoutError``: the job is retried from its checkpoint).

Unit ``i`` of a step is called as ``step(request_id, key, [conditioning], [unit])`` with ``key`` its
:class:`~deployments.contracts.UnitKey` (``unit_keys``): Serve's router places it by rendezvous hashing with a load
cap, the router's other jobs counted as load (:mod:`deployments.workers.placement`), so a step is spread evenly and
away from other jobs' units where there is room, each unit stays on its replica from step to step, and a scale event
moves few units; the replica's queue serves it by its job's remaining work.

A unit is put in the object store once and its call carries only the reference (in a list, so Ray hands it on
unresolved and the replica fetches it once it has accepted the call). Serve serializes a call's arguments again at
every attempt, and a replica at its ``max_ongoing_requests`` rejects the call, which the router then re-sends: with
the unit itself as the argument, every rejection would store the unit again (``docs/long-videos.md`` has the
measured cost).
At most ``max_in_flight`` units (the Denoisers' capacity at their largest) are stored and sent at once, so the
object store holds that many, not a whole step's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError

from deployments.contracts import UnitKey, rank_slot
from deployments.orchestrator.faults import UnitTimeoutError
from deployments.orchestrator.units import unit_keys
from pipeline.denoise import WindowStep, in_order

logger = logging.getLogger("ray.serve")

RETRYABLE = (RayActorError, ReplicaUnavailableError)
RetryHook = Callable[[WindowStep, int, BaseException], Awaitable[None] | None]


class RayDenoiserExecutor:
    """``on_retry(work, attempt, error)`` (sync or async) runs before each retry: the Orchestrator logs it on the
    job, so a client sees which unit was re-run. ``put`` stores a unit and returns what its calls carry (``ray.put``;
    tests without a cluster pass their own); ``max_in_flight`` bounds the units stored and sent at once;
    ``num_steps`` (the job's) gives each unit its job's remaining work, which orders it on its replica;
    ``unit_timeout_s`` bounds each call; ``on_unit_done()`` runs as each unit returns (the run's progress)."""

    def __init__(self, denoiser_handle, conditioning_ref: ray.ObjectRef, request_id: str, retries: int,
                 on_retry: RetryHook | None = None, put: Callable[[WindowStep], Any] = ray.put,
                 max_in_flight: int | None = None, num_steps: int | None = None,
                 unit_timeout_s: float | None = None, on_unit_done: Callable[[], None] | None = None):
        self.handle, self.request_id, self.put = denoiser_handle, request_id, put
        self.in_flight = asyncio.Semaphore(max_in_flight) if max_in_flight else contextlib.nullcontext()
        # One list for every call (a list, so Ray passes the reference on unresolved): ``close`` empties it, so
        # the arguments Serve keeps of finished calls stop pinning the conditioning in the object store.
        self.refs = [conditioning_ref]
        self.retries, self.on_retry = retries, on_retry
        self.num_steps = num_steps
        self.unit_timeout_s, self.on_unit_done = unit_timeout_s, on_unit_done
        self.last_replicas: set[str] = set()  # replicas that served the last batch
        self.last_placement: list[str | None] = []  # the replica of each unit of the last batch
        self.units_per_replica: Counter[str] = Counter()  # over the whole run
        self.retried = 0  # units re-sent after their replica failed or overran

    def close(self) -> None:
        """Drop the conditioning's reference, so the object store frees it once the caller's is gone too."""
        self.refs.clear()

    async def as_completed(self, steps: Sequence[WindowStep]) -> AsyncIterator[tuple[int, torch.Tensor]]:
        """All units are sent at once (the router sees the whole step: fan-out, placement, autoscaling); each
        ``(position, output)`` is handed on as it returns, so the caller can fuse and drop it. Leaving early (an
        error, a cancelled job) cancels the units still running."""
        self.last_replicas, self.last_placement = set(), [None] * len(steps)
        # A finished task holds its output: it is dropped as soon as its output is handed on, so the outputs
        # already fused are not kept until the step ends (at 600 s and 480x832 that would be 2.7 GiB).
        keys = unit_keys(steps, self.num_steps)
        pending = {asyncio.ensure_future(self._positioned(index, work, key))
                   for index, (work, key) in enumerate(zip(steps, keys, strict=True))}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                while done:
                    yield done.pop().result()
        finally:
            for task in pending:
                task.cancel()

    async def run(self, steps: Sequence[WindowStep]) -> list[torch.Tensor]:
        return await in_order(self.as_completed(steps), len(steps))

    async def _positioned(self, index: int, work: WindowStep, key: UnitKey) -> tuple[int, torch.Tensor]:
        return index, await self._run_one(index, work, key)

    async def _run_one(self, index: int, work: WindowStep, key: UnitKey) -> torch.Tensor:
        async with self.in_flight:  # units wait their turn here, in order, before they are stored
            return await self._send(index, work, key)

    async def _send(self, index: int, work: WindowStep, key: UnitKey) -> torch.Tensor:
        """Stores the unit once (it pickles just its own frames: ``WindowStep.__reduce__``) and sends its reference
        at every attempt. The list is emptied when the unit is done: Serve keeps a call's arguments for a while
        after it returned (lazily cleaned queues, cycles that only the garbage collector frees), and a reference
        it kept would keep the unit in the object store."""
        unit = [await asyncio.to_thread(self.put, work)]  # a put copies megabytes: off the event loop
        try:
            for attempt in range(self.retries + 1):
                try:
                    result = await self._call(key, unit)
                except (*RETRYABLE, UnitTimeoutError) as exc:
                    if attempt == self.retries:
                        raise
                    if isinstance(exc, UnitTimeoutError):
                        key = dataclasses.replace(key, detour=key.detour + 1)  # the hung replica is still placed
                    self.retried += 1
                    logger.warning("window %d step %d rows %s: replica failed (%s), retrying (%d/%d)", work.window,
                                   work.step, work.rows, type(exc).__name__, attempt + 1, self.retries)
                    if self.on_retry is not None:
                        outcome = self.on_retry(work, attempt + 1, exc)
                        if inspect.isawaitable(outcome):
                            await outcome
                    continue
                if self.on_unit_done is not None:
                    self.on_unit_done()
                if isinstance(result, tuple):  # (output, replica id) from the Denoiser deployment
                    result, replica = result
                    self.last_replicas.add(replica)
                    self.last_placement[index] = replica
                    self.units_per_replica[replica] += 1
                return result
            raise AssertionError("unreachable")
        finally:
            unit.clear()

    async def _call(self, key: UnitKey, unit: list) -> Any:
        """One try of a unit, cancelled on the replica after ``unit_timeout_s`` (``UnitTimeoutError``)."""
        response = self.handle.step.remote(self.request_id, key, self.refs, unit)
        if self.unit_timeout_s is None:
            return await response
        try:
            async with asyncio.timeout(self.unit_timeout_s):
                return await response
        except TimeoutError:
            response.cancel()
            raise UnitTimeoutError(f"a unit overran {self.unit_timeout_s:g} s (timeouts.unit_s) on every replica "
                                   "it was sent to") from None

    async def release(self, max_replicas: int, timeout_s: float = 30.0) -> int:
        """Tell the replicas to drop this request's conditioning and residuals: one ``free`` per rank
        (``max_replicas`` rank slots reach every replica of any set of up to that many). Returns the residuals
        dropped; a replica that fails or does not answer within ``timeout_s`` is skipped (its LRU bounds what it
        keeps)."""
        calls = [asyncio.ensure_future(self._free(rank_slot(self.request_id, i))) for i in range(max_replicas)]
        done, pending = await asyncio.wait(calls, timeout=timeout_s)
        for call in pending:
            call.cancel()
        return sum(call.result() for call in done if not call.cancelled() and call.exception() is None)

    async def _free(self, slot: int) -> int:
        return await self.handle.free.remote(self.request_id, slot)
