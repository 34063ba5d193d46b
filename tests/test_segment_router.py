"""The Postprocessor's request router through real Serve: one segment per replica at a time, the others wait in
the router until a replica is idle (never queued behind a busy one), while other calls still reach a busy replica.

The deployment is a stand-in with the Postprocessor's router and method names: a segment sleeps and says where it
ran, so what is measured is placement, not decoding. The calls are made from inside a replica, as the Orchestrator
makes them (all of one request's calls share Serve's internal request id).
"""

from __future__ import annotations

import asyncio
import time

import pytest
from ray import serve
from ray.serve.config import RequestRouterConfig

from deployments.workers.segment_router import SegmentRouter

SEGMENT_S = 1.5


@serve.deployment(max_ongoing_requests=5, ray_actor_options={"num_cpus": 0},
                  request_router_config=RequestRouterConfig(request_router_class=SegmentRouter))
class Segments:
    def __init__(self):
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.lock = asyncio.Lock()

    async def finish_segment(self, index: int) -> tuple[int, str, float, float]:
        async with self.lock:  # as the Postprocessor: one decode at a time
            started = time.time()
            await asyncio.sleep(SEGMENT_S)
            return index, self.replica, started, time.time()

    async def ready(self) -> str:
        return self.replica


@serve.deployment(max_ongoing_requests=4, ray_actor_options={"num_cpus": 0})
class Caller:
    def __init__(self, segments):
        self.segments = segments

    async def run(self, count: int) -> dict:
        started = time.time()
        answers = await asyncio.gather(*(self.segments.finish_segment.remote(i) for i in range(count)))
        return {"wall_s": time.time() - started, "answers": answers}

    async def probe_while_busy(self) -> float:
        """A readiness call made while every replica decodes a segment: answered at once."""
        busy = [self.segments.finish_segment.remote(i) for i in range(2)]
        await asyncio.sleep(0.5)
        started = time.time()
        await self.segments.ready.remote()
        answered = time.time() - started
        await asyncio.gather(*busy)
        return answered


@pytest.fixture(scope="module")
def caller(serve_cluster):
    handle = serve_cluster.run(Caller.bind(Segments.options(num_replicas=2).bind()), "segments", route_prefix=None)
    handle.run.remote(4).result(timeout_s=120)  # untimed: the caller's router learns of both replicas
    return handle


def test_segments_go_one_per_replica_and_the_rest_wait_for_an_idle_one(caller):
    result = caller.run.remote(4).result(timeout_s=120)
    answers = result["answers"]
    replicas = {replica for _, replica, _, _ in answers}
    assert len(replicas) == 2
    for replica in replicas:  # on each replica, segments ran one after another, never two queued at once
        spans = sorted((start, end) for _, r, start, end in answers if r == replica)
        assert len(spans) == 2
    starts = sorted(start for _, _, start, _ in answers)
    assert starts[1] - starts[0] < 0.5 * SEGMENT_S  # the first two started together, on the two replicas
    assert result["wall_s"] < 3 * SEGMENT_S  # 2 rounds of 1.5 s (serially on one replica: 6 s)


def test_other_calls_reach_a_busy_replica(caller):
    assert caller.probe_while_busy.remote().result(timeout_s=60) < SEGMENT_S
