"""The finish stage, from the Orchestrator's side: one Postprocessor call for a short video, segments for a long one.

``SegmentedFinish.finish`` runs the stage. ``SegmentedFinish.plan`` cuts the video's latents into segments (:func:`pipeline.segment_plan.plan_segments`): at
most one per Postprocessor replica the deployment may have (``postprocessor.max_replicas``), each at least
``min_segment_latents`` latents long, the decoder's reach taken from the preset without loading weights. One segment
(a short video, or one Postprocessor) is the serial path, which the caller runs as before: the CLI's bytes.

``SegmentedFinish.encode`` sends every segment at once (``Postprocessor.finish_segment``); the
:class:`~deployments.workers.segment_router.SegmentRouter` gives each its own replica, and the waiting ones make the
Postprocessors autoscale. The latents travel as the one reference the Orchestrator put (each segment reads its
slice in place); a segment's mp4 comes back as the call's return object, which the Orchestrator owns, so it
outlives the replica that made it, and only its reference is handed to ``stitch``. A segment whose replica died is
sent again, to any replica (``window_step_retries`` times, each a WARN line in the job's logs, as for units): a
segment is a pure function of the latents, so the retry cannot change a frame. A segment that still fails is the
job's error (:class:`PostprocessError`, named in its logs); nothing is stitched or uploaded then. A segment that
takes longer than ``timeouts.postprocess_s`` ends the attempt (``StageTimeoutError``: the job is retried).

The audio track is encoded here, once, while the segments are in flight (``SegmentedFinish.audio_track``:
:func:`~pipeline.media.audio_track.encode_audio_track_async`, the serial path's AAC settings cut to the video's
duration), and ``stitch`` only copies its packets: so the stitch's serial tail does not grow with an AAC encode of
the whole audio. The Orchestrator runs it (an ffmpeg child process: a few CPU seconds for ten minutes of audio)
rather than a Postprocessor call, which would hold a replica a segment may be waiting for. The track travels
to ``stitch`` as a numpy buffer argument (Ray puts it into the object store; the replica reads it in place). An
encode that fails is the job's error (:class:`PostprocessError`) before anything is stitched or uploaded, one that
takes longer than ``timeouts.postprocess_s`` ends the attempt like a segment; the first of the segments and the
audio track to fail cancels the others, and a cancelled encode kills its ffmpeg and removes its files.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import ray

from deployments.contracts import PostprocessResult, SegmentVideo
from deployments.orchestrator.executor import RETRYABLE
from deployments.orchestrator.faults import StageTimeoutError
from pipeline.media.audio_track import encode_audio_track_async
from pipeline.media.errors import FFmpegError
from pipeline.presets import ModelPreset
from pipeline.request import PreparedRequest, video_seconds
from pipeline.segment_plan import DecoderReach, LatentSegment, plan_segments

Report = Callable[..., Awaitable[None]]
# How the Orchestrator makes a Postprocessor call that retries a dead replica: (deployment name, call, report).
CallStage = Callable[[str, Callable[[], Awaitable[Any]], Report], Awaitable[Any]]


async def call_once(_deployment: str, call: Callable[[], Awaitable[Any]], _report: Report) -> Any:
    """A :data:`CallStage` without retries (benchmarks)."""
    return await call()

# What a plan for one replica is given as the reach: one segment, the whole video, has no warm-up whatever the reach.
WHOLE_VIDEO = DecoderReach((1,), (1.0,))


def _decoder_reach(preset: ModelPreset) -> DecoderReach:
    """The preset's decoder reach, its VAE built on the meta device; imported here, not at the top: the VAE's
    module loads diffusers' models, which an Orchestrator without segments never needs."""
    from pipeline.models.vae import preset_decoder_reach

    return preset_decoder_reach(preset)


class PostprocessError(RuntimeError):
    """A segment failed on every replica it was tried on, or the audio track could not be encoded: the job fails,
    nothing partial is returned."""


class SegmentedFinish:
    """Plans a video's segments and has them decoded and encoded on the Postprocessor replicas. With more than one
    replica the preset's decoder reach is derived here, at start (its VAE built on the meta device: no weights), so
    a preset whose VAE cannot be cut into segments is refused before any job runs."""

    def __init__(self, postprocessor, preset: ModelPreset, replicas: int, min_segment_latents: int, retries: int,
                 segment_timeout_s: float | None = None):
        # One handle for every call: handles made by ``options`` before the first call get routers of their own,
        # and each router would think the replicas the others had given segments to were idle. By reference: a
        # segment's answer stays an object the Orchestrator owns and hands on.
        self.postprocessor = postprocessor.options(_by_reference=True)
        self.replicas, self.min_segment_latents, self.retries = replicas, min_segment_latents, retries
        self.segment_timeout_s = segment_timeout_s
        self.reach = _decoder_reach(preset) if replicas > 1 else WHOLE_VIDEO

    def plan(self, prepared: PreparedRequest) -> tuple[LatentSegment, ...]:
        plan = prepared.plan
        return plan_segments(plan.decoded_latent_frames, self.replicas, self.min_segment_latents, self.reach,
                             plan.output_frames)

    def describe(self, segments: tuple[LatentSegment, ...]) -> str:
        """The job-log line announcing a segmented finish."""
        lengths = ", ".join(str(s.end - s.start) for s in segments)
        return (f"decoding and encoding in {len(segments)} segments on the Postprocessor replicas (latents per "
                f"segment: {lengths}; each but the first also decodes up to {self.reach.latents} latents before it)")

    async def finish(self, request_id: str, prepared: PreparedRequest, latents: list[ray.ObjectRef], key: str,
                     report: Report, call_stage: CallStage = call_once,
                     uploading: Callable[[], contextlib.AbstractAsyncContextManager] = contextlib.nullcontext,
                     ) -> PostprocessResult:
        """Decode, encode and upload the video as ``key``: serially on one replica (``finish``: the CLI's bytes),
        or in segments on several, stitched on one (``stitch``) with the audio track encoded here meanwhile.
        ``latents``: the latents' reference (emptied: they leave the object store). ``uploading()`` wraps the call
        that uploads (the Orchestrator's: a cancel waits for the write, the key is deleted unless the completion
        that names it wins)."""
        segments = self.plan(prepared)
        videos: list[ray.ObjectRef] = []
        track: np.ndarray | None = None
        try:
            if len(segments) > 1:
                await report(stage="postprocessing", message=self.describe(segments))
                videos, track = await self.encode_with_audio(request_id, prepared, segments, latents, report)
                latents.clear()
            else:
                await report(stage="postprocessing", message="decoding and encoding the video")
            async with uploading():
                if videos:
                    return await call_stage("Postprocessor", lambda: self.postprocessor.stitch.remote(
                        prepared, list(segments), videos, track, key), report)
                return await call_stage(
                    "Postprocessor", lambda: self.postprocessor.finish.remote(prepared, latents, key), report)
        finally:
            latents.clear()
            videos.clear()  # the segments' mp4s leave the object store

    async def encode_with_audio(self, request_id: str, prepared: PreparedRequest,
                                segments: tuple[LatentSegment, ...], latents: list[ray.ObjectRef], report: Report,
                                ) -> tuple[list[ray.ObjectRef], np.ndarray]:
        """:meth:`encode` and :meth:`audio_track` at once: the segments' references and the audio track. The first
        to fail cancels the other, and this returns only once both have ended (no ffmpeg left running)."""
        tasks = (asyncio.ensure_future(self.encode(request_id, prepared, segments, latents, report)),
                 asyncio.ensure_future(self.audio_track(prepared, len(segments), report)))
        try:
            videos, track = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
        return videos, track

    async def audio_track(self, prepared: PreparedRequest, count: int, report: Report) -> np.ndarray:
        """The request's audio cut to the video's duration, encoded as the serial path encodes it, as an audio-only
        mp4 (uint8) for ``stitch`` to copy."""
        seconds = video_seconds(prepared)
        await report(message=f"encoding the audio track ({seconds:.2f} s) while the {count} segments decode")
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.segment_timeout_s):
                data = await encode_audio_track_async(prepared.audio_bytes, seconds)
        except TimeoutError:
            raise StageTimeoutError(f"the audio track's encode took longer than {self.segment_timeout_s:g} s") \
                from None
        except FFmpegError as exc:
            reason = exc.stderr_tail.splitlines()[-1] if exc.stderr_tail else str(exc)
            await report(message=f"the audio track could not be encoded: {reason}", level="ERROR")
            raise PostprocessError(f"the audio track could not be encoded: {reason}") from exc
        await report(message=f"audio track encoded ({len(data)} bytes) in {time.perf_counter() - started:.1f} s")
        return np.frombuffer(data, np.uint8)

    async def encode(self, request_id: str, prepared: PreparedRequest, segments: tuple[LatentSegment, ...],
                     latents: list[ray.ObjectRef], report: Report) -> list[ray.ObjectRef]:
        """Every segment decoded and encoded on some Postprocessor replica; returns the references to their
        :class:`SegmentVideo` answers, in order. The first segment that fails for good cancels the others."""
        tasks = [asyncio.ensure_future(self._segment(request_id, prepared, s, len(segments), latents, report))
                 for s in segments]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    async def _segment(self, request_id: str, prepared: PreparedRequest, segment: LatentSegment, count: int,
                       latents: list[ray.ObjectRef], report: Report) -> ray.ObjectRef:
        name = f"segment {segment.index + 1}/{count} (frames {segment.frame_start}-{segment.frame_end - 1})"
        for attempt in range(self.retries + 1):
            started = time.perf_counter()
            try:
                response = self.postprocessor.finish_segment.remote(request_id, segment, latents, prepared.width,
                                                                    prepared.height)
                ref = await response._to_object_ref()
                async with asyncio.timeout(self.segment_timeout_s):
                    video: SegmentVideo = await ref  # read in place
            except TimeoutError:
                response.cancel()
                raise StageTimeoutError(f"{name}: the Postprocessor call took longer than "
                                        f"{self.segment_timeout_s:g} s") from None
            except RETRYABLE as exc:
                if attempt == self.retries:
                    await report(message=f"{name}: the Postprocessor replica failed ({type(exc).__name__}) "
                                         f"{self.retries + 1} times; giving up", level="ERROR")
                    raise PostprocessError(f"{name} failed on {self.retries + 1} Postprocessor replicas: "
                                           f"{type(exc).__name__}") from exc
                await report(message=f"{name}: the Postprocessor replica failed ({type(exc).__name__}); running it "
                                     f"again on another replica (retry {attempt + 1})", level="WARN")
                continue
            if (video.index, video.frames) != (segment.index, segment.frames):
                raise PostprocessError(f"{name}: the Postprocessor made segment {video.index} with {video.frames} "
                                       f"frames")
            await report(message=f"{name}: decoded and encoded on {video.replica} in "
                                 f"{time.perf_counter() - started:.1f} s")
            return ref
        raise AssertionError("unreachable")

