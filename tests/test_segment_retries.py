"""The Orchestrator's side of segmented post-processing without a cluster: the plan it makes from the settings, a
segment whose replica died is sent again (a WARN line per retry), and one that keeps failing is the job's error
after its retries, with the other segments cancelled and nothing handed on to be stitched.

The Postprocessor handle is a stand-in that mimics ``handle.options(...).finish_segment.remote(...)``: the call's
``_to_object_ref()`` and the reference's ``await``.
"""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import RayActorError

from deployments.contracts import SegmentVideo
from deployments.orchestrator.segments import PostprocessError, SegmentedFinish
from pipeline.generator import PreparedRequest
from pipeline.presets import get_preset
from pipeline.windows import SAMPLE_RATE, plan_windows


class Ref:
    def __init__(self, outcome):
        self.outcome = outcome

    def __await__(self):
        async def resolve():
            await asyncio.sleep(0.01)
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return self.outcome

        return resolve().__await__()


class Response:
    def __init__(self, ref: Ref):
        self.ref = ref

    async def _to_object_ref(self) -> Ref:
        return self.ref


class PostprocessorHandle:
    """``failures[i]``: how many calls of segment ``i`` die (``None``: every one)."""

    def __init__(self, failures: dict[int, int | None]):
        self.failures, self.calls, self.finished = dict(failures), [], []
        self.finish_segment = self

    def options(self, **options):
        assert options == {"_by_reference": True}  # answers stay objects the Orchestrator owns
        return self

    def remote(self, request_id, segment, latents, width, height):
        self.calls.append(segment.index)
        left = self.failures.get(segment.index, 0)
        if left is None or left > 0:
            if left is not None:
                self.failures[segment.index] = left - 1
            return Response(Ref(RayActorError()))
        self.finished.append(segment.index)
        return Response(Ref(SegmentVideo(segment.index, segment.frames, b"mp4", 0.1, "replica-x")))


def prepared(seconds: float) -> PreparedRequest:
    plan = plan_windows(round(seconds * SAMPLE_RATE), overlap=10)
    return PreparedRequest(request_id="r", seed=1, width=64, height=64, plan=plan, conditioning=None,
                           audio_bytes=b"", audio_seconds=seconds)


def finisher(handle, replicas: int = 4, retries: int = 2) -> SegmentedFinish:
    return SegmentedFinish(handle, get_preset("tiny"), replicas=replicas, min_segment_latents=20, retries=retries)


class Log:
    def __init__(self):
        self.lines: list[tuple[str, str]] = []

    async def __call__(self, stage=None, message=None, level="INFO"):
        self.lines.append((level, message))


def test_the_plan_follows_the_replicas_the_minimum_and_the_decoders_reach():
    long = prepared(60.0)  # 376 latents
    segments = finisher(PostprocessorHandle({})).plan(long)
    assert len(segments) == 4 and segments[-1].frame_end == long.plan.output_frames
    assert [s.warm_up for s in segments] == [0, 38, 38, 38]  # the tiny preset's Wan VAE: a reach of 38
    assert len(finisher(PostprocessorHandle({})).plan(prepared(4.0))) == 1  # 26 latents: one segment of at least 20 is all there is
    assert len(finisher(PostprocessorHandle({}), replicas=1).plan(long)) == 1  # one replica: the serial path


def test_a_segment_whose_replica_died_is_sent_again_and_logged():
    handle, log = PostprocessorHandle({1: 1, 2: 2}), Log()
    long = prepared(60.0)
    segments = finisher(handle).plan(long)
    refs = asyncio.run(finisher(handle).encode("r", long, segments, [object()], log))
    assert [r.outcome.index for r in refs] == [0, 1, 2, 3]  # references to each segment's answer, in order
    assert sorted(handle.calls) == [0, 1, 1, 2, 2, 2, 3]
    warnings = [m for level, m in log.lines if level == "WARN"]
    assert sorted(warnings) == [
        "segment 2/4 (frames 401-768): the Postprocessor replica failed (RayActorError); running it again on "
        "another replica (retry 1)",
        "segment 3/4 (frames 769-1132): the Postprocessor replica failed (RayActorError); running it again on "
        "another replica (retry 1)",
        "segment 3/4 (frames 769-1132): the Postprocessor replica failed (RayActorError); running it again on "
        "another replica (retry 2)"]


def test_a_segment_that_keeps_failing_fails_the_job_and_stops_the_others():
    handle, log = PostprocessorHandle({0: None}), Log()
    long = prepared(60.0)
    segments = finisher(handle, retries=2).plan(long)
    with pytest.raises(PostprocessError, match=r"segment 1/4 \(frames 0-400\) failed on 3 Postprocessor replicas"):
        asyncio.run(finisher(handle, retries=2).encode("r", long, segments, [object()], log))
    assert handle.calls.count(0) == 3
    assert [m for level, m in log.lines if level == "ERROR"] == [
        "segment 1/4 (frames 0-400): the Postprocessor replica failed (RayActorError) 3 times; giving up"]
