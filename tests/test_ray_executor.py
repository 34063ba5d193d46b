"""The Ray executor's retry rule and placement arguments, with a stand-in handle (no cluster): retry dead replicas,
bounded, in order; unit i of a step carries slot offset(request) + i."""

from __future__ import annotations

import asyncio
import contextlib
import weakref

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


class FreeingHandle:
    """Mimics ``handle.free.remote(request_id, slot)``: slot residue 1 fails, residue 2 never answers."""

    def __init__(self, replicas: int):
        self.replicas, self.slots = replicas, []
        self.free = self

    def remote(self, request_id, slot):
        self.slots.append(slot)

        async def answer():
            if slot % self.replicas == 1:
                raise RayActorError()
            if slot % self.replicas == 2:
                await asyncio.sleep(3600)
            return 10 + slot % self.replicas

        return answer()


def test_release_reaches_every_slot_residue_and_survives_dead_or_silent_replicas():
    handle = FreeingHandle(replicas=4)
    executor = RayDenoiserExecutor(handle, object(), "req", retries=0)
    freed = asyncio.run(executor.release(max_replicas=4, timeout_s=0.5))
    assert sorted(s % 4 for s in handle.slots) == [0, 1, 2, 3]  # max_replicas consecutive slots: every residue
    assert freed == 10 + 13  # residues 0 and 3 answered; 1 failed, 2 timed out


def test_as_completed_hands_on_each_output_as_it_returns_keeps_none_and_leaving_early_cancels_the_rest():
    finished: list[int] = []

    class SlowHandle:
        """Window k answers after 20·(delay(k)) ms with its latents + k."""

        def __init__(self, delay):
            self.delay, self.step = delay, self

        def remote(self, request_id, slot, refs, work):
            async def run():
                await asyncio.sleep(0.02 * self.delay(work.window))
                finished.append(work.window)
                return work.latents + work.window

            return run()

    executor = RayDenoiserExecutor(SlowHandle(lambda k: 5 - k), object(), "req", retries=0)

    async def everything():
        arrived, alive = [], []
        async with contextlib.aclosing(executor.as_completed(_steps(5))) as results:
            async for position, output in results:
                arrived.append((position, float(output.flatten()[0])))
                alive.append(sum(ref() is not None for ref in refs))  # outputs handed on before this one
                refs.append(weakref.ref(output))
                del output
        return arrived, alive

    refs: list[weakref.ref] = []
    arrived, alive = asyncio.run(everything())
    assert arrived == [(4, 4.0), (3, 3.0), (2, 2.0), (1, 1.0), (0, 0.0)]  # arrival order, each with its position
    assert alive == [0, 0, 0, 0, 0]  # the executor keeps no output it has handed on

    finished.clear()
    executor = RayDenoiserExecutor(SlowHandle(lambda k: k + 1), object(), "req", retries=0)

    async def first_only():
        async with contextlib.aclosing(executor.as_completed(_steps(4))) as results:
            first = await anext(results)
        await asyncio.sleep(0.15)  # the other units would have finished by now, had they not been cancelled
        return first[0]

    assert asyncio.run(first_only()) == 0 and finished == [0]


def test_what_the_call_machinery_keeps_of_a_unit_does_not_keep_the_latent_state_alive():
    """Serve keeps a call's arguments for a while after it returned (lazily cleaned queues, reference cycles that
    only the garbage collector frees); a unit is a view of the whole state, so the executor's parcel is emptied
    once its call returned, and still pickles as the unit itself while it runs."""
    import pickle

    kept, pickled = [], []

    class KeepingHandle:
        step = None

        def remote(self, request_id, slot, refs, parcel):
            kept.append(parcel)
            pickled.append(pickle.loads(pickle.dumps(parcel)))  # what a replica receives

            async def run():
                return parcel.latents + parcel.window  # reads as its unit while the call runs

            return run()

    handle = KeepingHandle()
    handle.step = handle
    state = torch.randn(1, 16, 60, 2, 2)
    alive = weakref.ref(state)
    units = [WindowStep(k, 0, state[:, :, 10 * k:10 * k + 21]) for k in range(3)]
    outputs = asyncio.run(RayDenoiserExecutor(handle, object(), "req", retries=0).run(units))
    assert all(torch.equal(out, state[:, :, 10 * k:10 * k + 21] + k) for k, out in enumerate(outputs))
    assert all(type(p) is WindowStep and p.window == k for k, p in enumerate(pickled))
    del state, units, outputs
    assert alive() is None and all(p.work is None for p in kept)  # the kept parcels hold nothing
    with pytest.raises(RuntimeError, match="after its call had returned"):
        pickle.dumps(kept[0])


def test_units_travel_with_their_own_frames_only():
    """A unit's latents and anchor latents are views into the whole latent: what is sent holds just the window,
    out of band under pickle protocol 5 (Ray's), so the sender never holds a pickled copy."""
    import pickle

    from pipeline.step_cache import CacheDirective

    whole = torch.randn(1, 16, 300, 8, 8)
    view = whole[:, :, 100:121]
    window_bytes = view.numel() * 4
    unit = WindowStep(3, 2, view, (1,), CacheDirective(reuse_from=1, anchor_latents=whole[:, :, 90:111]))
    sent = pickle.loads(pickle.dumps(unit))
    assert torch.equal(sent.latents, view) and torch.equal(sent.cache.anchor_latents, whole[:, :, 90:111])
    assert (sent.window, sent.step, sent.rows, sent.cache.reuse_from) == (3, 2, (1,), 1)
    assert len(pickle.dumps(unit)) < 2 * window_bytes + 4096  # 21 of 300 frames, twice
    buffers: list[pickle.PickleBuffer] = []
    assert len(pickle.dumps(unit, protocol=5, buffer_callback=buffers.append)) < 2048
    assert [memoryview(b).nbytes for b in buffers] == [window_bytes, window_bytes]
    plain = pickle.loads(pickle.dumps(WindowStep(0, 0, whole[:, :, :21])))
    assert plain.cache is None and plain.rows == (0, 1, 2) and torch.equal(plain.latents, whole[:, :, :21])


def test_an_async_retry_hook_is_awaited_before_the_retry():
    """The Orchestrator's hook writes a WARN line to the job's log (a database call): it must have run, in order,
    before the window-step runs again."""
    handle, events = FlakyHandle({2: 1}), []

    async def hook(work, attempt, exc):
        await asyncio.sleep(0.01)
        events.append(("logged", work.window, work.step, attempt, type(exc).__name__))

    executor = RayDenoiserExecutor(handle, object(), "req", retries=2, on_retry=hook)
    original = handle.remote

    def remote(request_id, slot, refs, work):
        events.append(("call", work.window))
        return original(request_id, slot, refs, work)

    handle.remote = remote
    asyncio.run(executor.run(_steps(3)))
    window_2 = [e for e in events if e[1] == 2]
    assert window_2 == [("call", 2), ("logged", 2, 0, 1, "RayActorError"), ("call", 2)]
