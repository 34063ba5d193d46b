"""The Ray executor's retry rule and placement arguments, with a stand-in handle (no cluster): retry dead replicas,
bounded, in order; unit i of a step carries slot offset(request) + i."""

from __future__ import annotations

import asyncio

import pytest
import torch
from ray.exceptions import RayActorError

from deployments.placement import request_offset
from deployments.ray_executor import RayDenoiserExecutor
from pipeline.denoise import WindowStep


class FlakyHandle:
    """Mimics ``handle.step.remote(...)``: fails the first ``failures[window]`` calls of a window."""

    def __init__(self, failures: dict[int, int]):
        self.failures, self.calls, self.slots = dict(failures), [], {}
        self.step = self

    def remote(self, request_id, slot, refs, work: WindowStep):
        self.calls.append(work.window)
        self.slots.setdefault(work.window, set()).add((request_id, slot))

        async def run():
            await asyncio.sleep(0.001 * (5 - work.window))  # finish out of order
            if self.failures.get(work.window, 0) > 0:
                self.failures[work.window] -= 1
                raise RayActorError()
            return work.latents + work.window

        return run()


def _steps(n: int) -> list[WindowStep]:
    return [WindowStep(i, 0, torch.zeros(1, 16, 21, 2, 2)) for i in range(n)]


def test_dead_replica_is_retried_and_results_stay_in_order():
    handle, retries = FlakyHandle({1: 1, 3: 2}), []
    executor = RayDenoiserExecutor(handle, object(), "req", retries=3,
                                   on_retry=lambda w, n, exc: retries.append((w.window, n)))
    outputs = asyncio.run(executor.run(_steps(5)))
    assert [int(o[0, 0, 0, 0, 0]) for o in outputs] == [0, 1, 2, 3, 4]
    assert sorted(retries) == [(1, 1), (3, 1), (3, 2)] and executor.retried == 3
    assert handle.calls.count(3) == 3
    # every attempt of unit i carries the same placement: (request id, offset + i)
    assert handle.slots == {i: {("req", request_offset("req") + i)} for i in range(5)}


def test_retries_are_bounded():
    executor = RayDenoiserExecutor(FlakyHandle({0: 5}), object(), "req", retries=2)
    with pytest.raises(RayActorError):
        asyncio.run(executor.run(_steps(1)))
