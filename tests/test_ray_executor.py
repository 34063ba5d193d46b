"""The Ray executor's retry rule, with a stand-in handle (no cluster): retry dead replicas, bounded, in order."""

from __future__ import annotations

import asyncio

import pytest
import torch
from ray.exceptions import RayActorError

from deployments.ray_executor import RayDenoiserExecutor
from pipeline.denoise import WindowStep


class FlakyHandle:
    """Mimics ``handle.step.remote(...)``: fails the first ``failures[window]`` calls of a window."""

    def __init__(self, failures: dict[int, int]):
        self.failures, self.calls = dict(failures), []
        self.step = self

    def remote(self, refs, request_id, work: WindowStep):
        self.calls.append(work.window)

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
    assert sorted(retries) == [(1, 1), (3, 1), (3, 2)]
    assert handle.calls.count(3) == 3


def test_retries_are_bounded():
    executor = RayDenoiserExecutor(FlakyHandle({0: 5}), object(), "req", retries=2)
    with pytest.raises(RayActorError):
        asyncio.run(executor.run(_steps(1)))


def test_an_async_retry_hook_is_awaited_before_the_retry():
    """The Orchestrator's hook writes a WARN line to the job's log (a database call): it must have run, in order,
    before the window-step runs again."""
    handle, events = FlakyHandle({2: 1}), []

    async def hook(work, attempt, exc):
        await asyncio.sleep(0.01)
        events.append(("logged", work.window, work.step, attempt, type(exc).__name__))

    executor = RayDenoiserExecutor(handle, object(), "req", retries=2, on_retry=hook)
    original = handle.remote

    def remote(refs, request_id, work):
        events.append(("call", work.window))
        return original(refs, request_id, work)

    handle.remote = remote
    asyncio.run(executor.run(_steps(3)))
    window_2 = [e for e in events if e[1] == 2]
    assert window_2 == [("call", 2), ("logged", 2, 0, 1, "RayActorError"), ("call", 2)]
