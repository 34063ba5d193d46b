"""Placement of units on Denoiser replicas through Serve's request router: balanced, sticky across steps, adapting
to a scale change; the replica's GPU queue is fair across concurrent jobs; and the caller never busy-loops.

The cluster tests run the units from inside a replica (``UnitCaller``), as the Orchestrator does: every call made
while a replica serves one request shares Serve's internal request id, which is what Serve's default matching
cannot handle (see ``deployments/workers/placement.py``). The Denoisers run the ``simulated-fast`` stand-in DiT (0.2 s per
guidance row, ``bench/simulated.py``).
"""

from __future__ import annotations

import asyncio
import collections
import os
import time

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from ray import serve  # noqa: E402

from deployments.config import AppArgs  # noqa: E402
from deployments.contracts import request_offset, unit_slot  # noqa: E402
from deployments.orchestrator.executor import RayDenoiserExecutor  # noqa: E402
from deployments.workers.denoiser import Denoiser  # noqa: E402
from deployments.workers.placement import place, placement_slot  # noqa: E402
from deployments.workers.unit_queue import RoundRobinGate  # noqa: E402
from pipeline.denoise import RequestConditioning, WindowStep  # noqa: E402
from testing.ray_serve import object_store_stats  # noqa: E402

APP = "placement"
ROW_S = 0.2  # the simulated-fast preset's seconds per guidance row


# -- the rule ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("units,replicas", [(24, 8), (7, 3), (6, 6), (2, 6), (72, 5)])
def test_a_step_is_spread_evenly_and_each_slot_keeps_its_replica(units, replicas):
    names = [f"r{i}" for i in reversed(range(replicas))]  # the router's list is in no particular order
    offset = request_offset("job")
    per_step = [[place(offset + i, names) for i in range(units)] for _step in range(3)]
    counts = collections.Counter(per_step[0])
    assert set(counts.values()) <= {units // replicas, -(-units // replicas)}
    assert len(counts) == min(units, replicas)
    assert per_step[0] == per_step[1] == per_step[2]  # sticky: unit i on the same replica at every step
    assert per_step[0] == [sorted(names)[(offset + i) % replicas] for i in range(units)]


def test_a_scale_change_places_by_the_new_count():
    before, after = ["a", "b", "c"], ["a", "b", "c", "d"]
    slots = [unit_slot("job", i) for i in range(8)]
    assert collections.Counter(place(s, after) for s in slots) == {"a": 2, "b": 2, "c": 2, "d": 2}
    assert [place(s, after) for s in slots] == [after[s % 4] for s in slots]
    assert [place(s, before) for s in slots] != [place(s, after) for s in slots]


def test_offsets_are_stable_hashes_and_slots_are_read_from_plain_leading_arguments():
    assert request_offset("job") == 57_592  # crc32, not Python's salted hash: the same in every process
    assert {request_offset(f"job-{i}") for i in range(50)} != {request_offset("job-0")}
    assert placement_slot(["job", 7, [None], object()]) == 7
    assert placement_slot([]) is None and placement_slot(["job"]) is None
    assert placement_slot([7, "job"]) is None and placement_slot(["job", True]) is None


# -- the replica's GPU queue -------------------------------------------------------------------------------------
async def _run_through(gate: RoundRobinGate, arrivals: list[str]) -> list[str]:
    """Each arrival takes the gate for a moment; the first arrives while the gate is idle, the rest queue."""
    order = []

    async def unit(key: str, index: int) -> None:
        async with gate.hold(key):
            order.append(f"{key}{index}")
            await asyncio.sleep(0.001)

    tasks = [asyncio.ensure_future(unit(key, i)) for i, key in enumerate(arrivals)]
    await asyncio.gather(*tasks)
    return order


def test_gate_serves_waiting_requests_round_robin():
    arrivals = ["a"] * 6 + ["b", "c", "b"]  # job a queued a whole step before b and c arrived
    order = asyncio.run(_run_through(RoundRobinGate(), arrivals))
    assert order == ["a0", "b6", "c7", "a1", "b8", "a2", "a3", "a4", "a5"]
    fifo = asyncio.run(_run_through(RoundRobinGate("fifo"), arrivals))
    assert fifo == ["a0", "a1", "a2", "a3", "a4", "a5", "b6", "c7", "b8"]  # b waits behind a's whole step


def test_gate_hands_on_when_waiters_are_cancelled():
    """b is cancelled while it waits; c is cancelled after the gate was handed to it but before it ran: the gate
    must go on to d either way, and end free."""

    async def scenario() -> list[str]:
        gate, order, tasks = RoundRobinGate(), [], {}
        release = asyncio.Event()

        async def unit(key: str, wait: asyncio.Event | None = None, after=None) -> None:
            async with gate.hold(key):
                order.append(key)
                if wait is not None:
                    await wait.wait()
            if after is not None:
                after()  # runs right after the release, before the next holder is scheduled

        tasks["a"] = asyncio.ensure_future(unit("a", release, after=lambda: tasks["c"].cancel()))
        await asyncio.sleep(0)
        for key in "bcd":
            tasks[key] = asyncio.ensure_future(unit(key))
        await asyncio.sleep(0)
        assert gate.waiting == 3
        tasks["b"].cancel()
        await asyncio.sleep(0)
        release.set()
        outcomes = await asyncio.gather(*tasks.values(), return_exceptions=True)
        assert [type(o).__name__ for o in outcomes] == ["NoneType", "CancelledError", "CancelledError", "NoneType"]
        assert not gate.held and gate.waiting == 0
        return order

    assert asyncio.run(asyncio.wait_for(scenario(), 5)) == ["a", "d"]


# -- through Serve's router, from inside a replica ---------------------------------------------------------------
def fake_conditioning(request_id: str, windows: int, steps: int, h: int = 2, w: int = 2) -> RequestConditioning:
    return RequestConditioning(
        request_id=request_id, text_positive=torch.zeros(3, 8), text_negative=torch.zeros(3, 8),
        clip_context=torch.zeros(1, 257, 8), y=torch.zeros(1, 20, 21, h, w),
        audio_features=[torch.zeros(1, 4, 8) for _ in range(windows)], seq_len=21 * h * w // 4, num_steps=steps,
        text_scale=5.0, audio_scale=4.0)


@serve.deployment(max_ongoing_requests=8)
class UnitCaller:
    """Runs a job's steps of units through the Ray executor, as the Orchestrator does."""

    def __init__(self, denoiser):
        self.denoiser = denoiser

    async def run(self, request_id: str, units: int, steps: int, rows: tuple[int, ...] = (0,), size: int = 2) -> dict:
        """``size``: the latents' height and width (2: units small enough to travel inside their calls)."""
        conditioning = fake_conditioning(request_id, units, steps, size, size)
        executor = RayDenoiserExecutor(self.denoiser, ray.put(conditioning), request_id, retries=2)
        latents = torch.zeros(1, 16, 21, size, size)
        placements, step_s = [], []
        cpu, wall = time.process_time(), time.perf_counter()
        for step in range(steps):
            started = time.perf_counter()
            await executor.run([WindowStep(i, step, latents + i, rows) for i in range(units)])
            placements.append(list(executor.last_placement))
            step_s.append(time.perf_counter() - started)
        return {"placements": placements, "step_s": step_s, "cpu_s": time.process_time() - cpu,
                "wall_s": time.perf_counter() - wall}


@pytest.fixture(scope="module")
def cluster(serve_cluster):
    yield serve_cluster
    _deployed.clear()


_deployed: dict = {}  # "options" and "handle" of the application as deployed last


def deploy(replicas: int, **denoiser_options) -> serve.handle.DeploymentHandle:
    """The caller and ``replicas`` Denoisers; the running application is kept when it already has these options
    (``serve.run`` would restart every replica of an application it is given again)."""
    options = {"num_replicas": replicas, **denoiser_options}
    if _deployed.get("options") != options:
        args = AppArgs.model_validate({"preset": "simulated-fast", "preset_modules": ["bench.simulated"],
                                       "device": "cpu", "denoiser": options})
        denoiser = Denoiser.options(**args.denoiser.serve_options()).bind(args)
        _deployed.update(options=options, handle=serve.run(UnitCaller.bind(denoiser), name=APP, route_prefix=None))
    status = serve.status().applications[APP].deployments["Denoiser"].replica_states
    assert status.get("RUNNING") == replicas, status
    return _deployed["handle"]


def replica_ids(handle_app: str = APP) -> list[str]:
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{handle_app}#Denoiser#")]
    return sorted(name.rsplit("#", 1)[1] for name in names)


def test_a_short_job_does_not_wait_behind_another_jobs_step_queue(cluster):
    """One replica; job A queues 10 units per step, job B one. Round-robin lets each B unit wait for at most one
    A unit, so B's step takes a small fraction of A's (first come, first served would make it about as long)."""
    caller = deploy(1)
    long_job = caller.run.remote("long-job", 10, 3)
    time.sleep(1.0)  # A's first step is queued on the replica
    short = caller.run.remote("short-job", 1, 3).result(timeout_s=120)
    long = long_job.result(timeout_s=120)
    a_step = sum(long["step_s"]) / len(long["step_s"])
    b_step = sum(short["step_s"]) / len(short["step_s"])
    print("fairness:", short["step_s"], long["step_s"])
    assert b_step < 0.4 * a_step, (short["step_s"], long["step_s"])


def test_units_are_balanced_and_sticky_and_follow_a_scale_change(cluster):
    caller = deploy(3)
    result = caller.run.remote("sticky-job", 7, 3).result(timeout_s=120)
    ids = replica_ids()
    assert len(ids) == 3
    offset = request_offset("sticky-job")
    expected = [ids[(offset + i) % 3] for i in range(7)]
    assert result["placements"] == [expected] * 3  # sorted(replicas)[slot mod 3] at every step
    assert sorted(collections.Counter(expected).values()) == [2, 2, 3]

    caller = deploy(4)  # scale up: the same application, one more replica
    ids = replica_ids()
    assert len(ids) == 4
    deadline = time.monotonic() + 60
    while True:  # the caller's router learns of the new replica through Serve's long poll
        result = caller.run.remote("sticky-job", 8, 2).result(timeout_s=120)
        if len(set(result["placements"][-1])) == 4 or time.monotonic() > deadline:
            break
    assert result["placements"][-1] == [ids[(offset + i) % 4] for i in range(8)]
    assert collections.Counter(result["placements"][-1]) == {replica: 2 for replica in ids}


def test_the_caller_does_not_busy_loop_even_when_replicas_reject(cluster):
    """The caller's process CPU time stays a small fraction of the wall time: with the default queue (no
    rejections), and with replicas that take one unit at a time (every other unit is rejected and re-routed after
    Serve's back-off, the situation that spun at ~94 % CPU with a router that did not ask for back-off)."""
    caller = deploy(4)  # as the previous test left it: no restart
    result = caller.run.remote("cpu-job", 12, 3).result(timeout_s=120)
    print("default queue:", result)
    assert result["wall_s"] >= 3 * 3 * ROW_S
    assert result["cpu_s"] < 0.25 * result["wall_s"], result

    caller = deploy(2, max_ongoing_requests=1)  # restarts the replicas (two are enough)
    result = caller.run.remote("cpu-job-full", 8, 2).result(timeout_s=120)
    print("one unit per replica:", result)
    assert result["wall_s"] >= 2 * 4 * ROW_S
    assert result["cpu_s"] < 0.35 * result["wall_s"], result
    ids = replica_ids()
    offset = request_offset("cpu-job-full")
    assert result["placements"][-1] == [ids[(offset + i) % 2] for i in range(8)]  # still sticky when full


def test_a_unit_rejected_by_full_replicas_is_stored_once(cluster):
    """Replicas that take one unit at a time reject the rest, and Serve's router re-sends each rejected call;
    every attempt carries the stored unit's reference, so the object store receives each unit once (and each
    output once), however many attempts there were (with the unit as the call's argument, every attempt stored
    it again: 12-17 GiB per step instead of 5.3 at 600 s, bench/results/long_video.txt)."""
    caller = deploy(2, max_ongoing_requests=1)  # as the previous test left it: no restart
    units, steps, size = 8, 2, 16
    unit_bytes = 16 * 21 * size * size * 4  # 344 KiB: more than Ray inlines in a call, so it is stored
    before = object_store_stats()["created"]
    result = caller.run.remote("stored-once", units, steps, size=size).result(timeout_s=120)
    created = object_store_stats()["created"] - before
    conditioning = 20 * 21 * size * size * 4  # y, the largest part
    expected = units * steps * 2 * unit_bytes + conditioning  # each unit in, each output back
    print("object store bytes created:", created, "expected about", expected, result)
    assert expected <= created <= expected + units * steps * 0.05 * unit_bytes + 2**20
