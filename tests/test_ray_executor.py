"""The Ray executor's retry rule and placement arguments, with a stand-in handle (no cluster): retry dead replicas,
bounded, in order; unit i of a step carries its routing key (its place in the step, its job's remaining work)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import weakref

import pytest
import torch
from ray.exceptions import RayActorError

from deployments.contracts import UnitKey
from deployments.orchestrator.executor import RayDenoiserExecutor
from deployments.orchestrator.faults import UnitTimeoutError
from deployments.workers.placement import place_units
from pipeline.denoise import WindowStep


class FlakyHandle:
    """Mimics ``handle.step.remote(...)``: fails the first ``failures[window]`` calls of a window."""

    def __init__(self, failures: dict[int, int]):
        self.failures, self.calls, self.slots = dict(failures), [], {}
        self.step = self

    def remote(self, request_id, slot, refs, unit: list[WindowStep]):
        work = unit[0]
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


def in_process(work: WindowStep) -> WindowStep:
    """The executor's ``put`` without a cluster: the call carries the unit itself."""
    return work


def executor_for(handle, retries: int = 0, **kwargs) -> RayDenoiserExecutor:
    return RayDenoiserExecutor(handle, object(), "req", retries=retries, put=in_process, **kwargs)


def test_dead_replica_is_retried_and_results_stay_in_order():
    handle, retries = FlakyHandle({1: 1, 3: 2}), []
    executor = executor_for(handle, 3, on_retry=lambda w, n, exc: retries.append((w.window, n)))
    outputs = asyncio.run(executor.run(_steps(5)))
    assert [int(o[0, 0, 0, 0, 0]) for o in outputs] == [0, 1, 2, 3, 4]
    assert sorted(retries) == [(1, 1), (3, 1), (3, 2)] and executor.retried == 3
    assert handle.calls.count(3) == 3
    # every attempt of unit i carries the same key: unit i of 5, the job's rows left (one step of 5 x 3 rows)
    assert handle.slots == {i: {("req", UnitKey(i, 5, remaining=15, continues=False))} for i in range(5)}
    with_steps = executor_for(FlakyHandle({}), num_steps=4)  # at step 0 of 4: 4 steps of 15 rows left
    handle = with_steps.handle
    asyncio.run(with_steps.run(_steps(5)))
    assert handle.slots == {i: {("req", UnitKey(i, 5, remaining=60, continues=True))} for i in range(5)}


def test_retries_are_bounded():
    executor = executor_for(FlakyHandle({0: 5}), 2)
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
    executor = executor_for(handle)
    freed = asyncio.run(executor.release(max_replicas=4, timeout_s=0.5))
    assert sorted(s % 4 for s in handle.slots) == [0, 1, 2, 3]  # max_replicas consecutive slots: every residue
    assert freed == 10 + 13  # residues 0 and 3 answered; 1 failed, 2 timed out


def test_as_completed_hands_on_each_output_as_it_returns_keeps_none_and_leaving_early_cancels_the_rest():
    finished: list[int] = []

    class GatedHandle:
        """Window k answers its latents + k once the test opens its gate: the order of completion is the test's,
        whatever the machine's load does to timers."""

        def __init__(self):
            self.step, self.gates = self, collections.defaultdict(asyncio.Event)

        def remote(self, request_id, slot, refs, unit):
            work = unit[0]

            async def run():
                await self.gates[work.window].wait()
                finished.append(work.window)
                return work.latents + work.window

            return run()

    order = [4, 3, 2, 1, 0]
    handle = GatedHandle()
    executor = executor_for(handle)

    async def everything():
        arrived, alive = [], []
        handle.gates[order[0]].set()
        # Bounded: an executor that waited for the units in their own order would wait for a gate never opened.
        async with asyncio.timeout(10), contextlib.aclosing(executor.as_completed(_steps(5))) as results:
            async for position, output in results:
                arrived.append((position, float(output.flatten()[0])))
                alive.append(sum(ref() is not None for ref in refs))  # outputs handed on before this one
                refs.append(weakref.ref(output))
                del output
                if len(arrived) < len(order):
                    handle.gates[order[len(arrived)]].set()
        return arrived, alive

    refs: list[weakref.ref] = []
    arrived, alive = asyncio.run(everything())
    assert arrived == [(4, 4.0), (3, 3.0), (2, 2.0), (1, 1.0), (0, 0.0)]  # arrival order, each with its position
    assert alive == [0, 0, 0, 0, 0]  # the executor keeps no output it has handed on

    finished.clear()
    handle = GatedHandle()
    executor = executor_for(handle)

    async def first_only():
        handle.gates[0].set()
        async with contextlib.aclosing(executor.as_completed(_steps(4))) as results:
            first = await anext(results)
        for gate in range(4):  # a unit that was not cancelled would finish now
            handle.gates[gate].set()
        await asyncio.sleep(0.05)
        return first[0]

    assert asyncio.run(first_only()) == 0 and finished == [0]


def test_what_the_call_machinery_keeps_of_a_unit_does_not_keep_the_unit_alive():
    """Serve keeps a call's arguments for a while after it returned (lazily cleaned queues, reference cycles that
    only the garbage collector frees): the list that carries the unit's reference is emptied once the unit is
    done, so what Serve kept no longer pins the stored unit (here: the unit itself, a view of the whole state)."""
    kept = []

    class KeepingHandle:
        step = None

        def remote(self, request_id, slot, refs, unit):
            kept.append(unit)
            work = unit[0]

            async def run():
                return work.latents + work.window

            return run()

    handle = KeepingHandle()
    handle.step = handle
    state = torch.randn(1, 16, 60, 2, 2)
    alive = weakref.ref(state)
    units = [WindowStep(k, 0, state[:, :, 10 * k:10 * k + 21]) for k in range(3)]
    outputs = asyncio.run(executor_for(handle).run(units))
    assert all(torch.equal(out, state[:, :, 10 * k:10 * k + 21] + k) for k, out in enumerate(outputs))
    del state, units, outputs
    assert alive() is None and kept == [[], [], []]  # the kept arguments hold nothing


def test_a_unit_is_stored_once_whatever_the_attempts():
    """A replica's death (our retry) or a full replica (Serve's re-send) makes another attempt of the same call:
    each attempt carries the stored unit's reference, never a new copy of the unit."""
    stored: list[int] = []

    def put(work: WindowStep) -> WindowStep:
        stored.append(work.window)
        return work

    handle = FlakyHandle({0: 2, 2: 1})
    executor = RayDenoiserExecutor(handle, object(), "req", retries=3, put=put)
    asyncio.run(executor.run(_steps(4)))
    assert len(handle.calls) == 4 + 3 and sorted(stored) == [0, 1, 2, 3]


def test_at_most_max_in_flight_units_are_stored_and_sent_at_once_in_order():
    events: list[tuple[str, int]] = []
    running = [0, 0]  # now, most

    def put(work: WindowStep) -> WindowStep:
        events.append(("stored", work.window))
        return work

    class CountingHandle:
        def __init__(self):
            self.step = self

        def remote(self, request_id, slot, refs, unit):
            work = unit[0]

            async def run():
                running[0] += 1
                running[1] = max(running)
                await asyncio.sleep(0.01)
                running[0] -= 1
                events.append(("done", work.window))
                return work.latents + work.window

            return run()

    executor = RayDenoiserExecutor(CountingHandle(), object(), "req", retries=0, put=put, max_in_flight=2)
    outputs = asyncio.run(executor.run(_steps(6)))
    assert [int(o.flatten()[0]) for o in outputs] == list(range(6))
    assert running[1] == 2
    stored = [window for kind, window in events if kind == "stored"]
    assert stored == list(range(6))  # in order
    for k in range(2, 6):  # unit k is stored only after some unit has finished, freeing its place
        assert events.index(("stored", k)) > min(events.index(("done", j)) for j in range(k))
    assert sum(1 for kind, _ in events[:events.index(("done", 0))] if kind == "stored") <= 2


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

    executor = executor_for(handle, 2, on_retry=hook)
    original = handle.remote

    def remote(request_id, slot, refs, unit):
        events.append(("call", unit[0].window))
        return original(request_id, slot, refs, unit)

    handle.remote = remote
    asyncio.run(executor.run(_steps(3)))
    window_2 = [e for e in events if e[1] == 2]
    assert window_2 == [("call", 2), ("logged", 2, 0, 1, "RayActorError"), ("call", 2)]


class Response:
    """Mimics a ``DeploymentResponse``: awaitable, and ``cancel()`` stops the call on its replica."""

    def __init__(self, coro):
        self.task = asyncio.ensure_future(coro)
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.task.cancel()

    def __await__(self):
        return self.task.__await__()


class HungReplicaHandle:
    """Replica placement as Serve's router does it (the key's placement among the replica ids, ``detour`` replicas
    further); replica 0 never answers (a wedged forward), the others answer at once."""

    def __init__(self, replicas: int):
        self.replicas, self.calls = replicas, []
        self.step = self

    def remote(self, request_id, key: UnitKey, refs, unit: list[WindowStep]):
        ids = [f"r{i}" for i in range(self.replicas)]
        placed = place_units(request_id, key.units, ids)[key.index]
        work, replica = unit[0], (ids.index(placed) + key.detour) % self.replicas

        async def run():
            if replica == 0:
                await asyncio.Event().wait()
            return work.latents + work.window

        response = Response(run())
        self.calls.append((work.window, replica, response))
        return response


def test_a_unit_that_overruns_on_a_hung_replica_is_cancelled_and_sent_to_the_next_one():
    handle, retries, done = HungReplicaHandle(2), [], []
    executor = executor_for(handle, 2, unit_timeout_s=0.2, on_retry=lambda w, n, exc: retries.append((w.window, exc)),
                            on_unit_done=lambda: done.append(1))
    outputs = asyncio.run(executor.run(_steps(4)))
    assert [int(o[0, 0, 0, 0, 0]) for o in outputs] == [0, 1, 2, 3]
    hung = [(window, response) for window, replica, response in handle.calls if replica == 0]
    assert hung and all(response.cancelled for _, response in hung)  # the call stopped on the hung replica
    assert sorted(w for w, _ in retries) == sorted(w for w, _ in hung)
    answered = {window for window, replica, _ in handle.calls if replica == 1}
    assert answered == {0, 1, 2, 3}  # each retry went one replica further, to the live one
    assert all(isinstance(exc, UnitTimeoutError) for _, exc in retries) and len(done) == 4


def test_a_unit_that_overruns_on_every_try_ends_the_attempt():
    executor = executor_for(HungReplicaHandle(1), 2, unit_timeout_s=0.1)
    with pytest.raises(UnitTimeoutError, match="timeouts.unit_s"):
        asyncio.run(executor.run(_steps(1)))
