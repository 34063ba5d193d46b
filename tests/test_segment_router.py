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

    async def finish_segment(self, index: int) -> tuple[int, str, float, float, float]:
        """(index, replica, arrived, started, ended), on the machine-wide monotonic clock."""
        arrived = time.monotonic()
        async with self.lock:  # as the Postprocessor: one decode at a time
            started = time.monotonic()
            await asyncio.sleep(SEGMENT_S)
            return index, self.replica, arrived, started, time.monotonic()

    async def ready(self) -> str:
        return self.replica


@serve.deployment(max_ongoing_requests=4, ray_actor_options={"num_cpus": 0})
class Caller:
    def __init__(self, segments):
        self.segments = segments

    async def run(self, count: int) -> list[tuple[int, str, float, float, float]]:
        return await asyncio.gather(*(self.segments.finish_segment.remote(i) for i in range(count)))

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
    answers = caller.run.remote(4).result(timeout_s=120)
    by_replica: dict[str, list[tuple[float, float, float]]] = {}
    for _, replica, arrived, started, ended in answers:
        by_replica.setdefault(replica, []).append((arrived, started, ended))
    assert sorted(len(spans) for spans in by_replica.values()) == [2, 2], by_replica
    for spans in by_replica.values():
        (_, _, first_ended), (second_arrived, _, _) = sorted(spans)
        # The later segment reached this replica only once the earlier one had ended: it waited in the router,
        # not queued behind a busy replica.
        assert second_arrived >= first_ended, spans
    firsts = [min(spans) for spans in by_replica.values()]
    # The first two ran at the same time, one on each replica.
    assert max(started for _, started, _ in firsts) < min(ended for _, _, ended in firsts), firsts


def test_other_calls_reach_a_busy_replica(caller):
    assert caller.probe_while_busy.remote().result(timeout_s=60) < SEGMENT_S
