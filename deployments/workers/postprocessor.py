"""Postprocessor: streaming VAE decode into ffmpeg (H.264 + AAC) and upload of the mp4 to storage.

A short video is one call, ``finish``: the serial path, the CLI's bytes. A long one is cut into segments
(:mod:`deployments.orchestrator.segments`): ``finish_segment`` decodes and encodes one segment on any replica (its
warm-up primes the decoder, so its frames are the serial stream's, bit for bit) and returns the segment's
video-only mp4; ``stitch`` joins them and the audio track the Orchestrator encoded meanwhile, copying both (nothing
is re-encoded), and uploads one object. The :class:`~deployments.workers.segment_router.SegmentRouter` gives each
segment a replica of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import ray
import torch
from ray import serve
from ray.serve.config import RequestRouterConfig

from deployments.config import AppArgs
from deployments.contracts import PostprocessResult, SegmentVideo
from deployments.runtime.replica import releases_freed_heap, replica_name
from deployments.runtime.transport import take_tensor
from deployments.storage import make_storage
from deployments.workers.models import load_replica_models
from deployments.workers.segment_router import SegmentRouter
from pipeline.generator import PipelineSettings, PreparedRequest, StableAvatarPipeline, stitch_segments
from pipeline.segment_plan import LatentSegment

# Test hook (never set in production): a JSON file {"segment": i}; the first replica that receives segment i of any
# job claims the file and exits while decoding it, so a test's kill lands on a replica that holds a segment.
CRASH_FILE_ENV = "STABLE_AVATAR_TEST_POSTPROCESSOR_CRASH_FILE"
# Past the call's acceptance, so the Orchestrator's retry is tested, not Serve's re-send of a call whose replica died
# before the caller's router read the acceptance: a caller busy on a loaded machine has taken over 2 s to read it.
CRASH_DELAY_S = 5.0


@serve.deployment(name="Postprocessor",
                  request_router_config=RequestRouterConfig(request_router_class=SegmentRouter))
class Postprocessor:
    def __init__(self, args: AppArgs):
        bundle = load_replica_models(args, args.postprocessor, ["vae"])
        self.pipeline = StableAvatarPipeline(bundle, PipelineSettings.model_validate(args.pipeline.model_dump()))
        self.storage = make_storage(args.storage)
        self._lock = asyncio.Lock()  # one streaming decode per VAE at a time
        crash_file = os.environ.get(CRASH_FILE_ENV)
        self._crash_file = Path(crash_file) if crash_file else None

    def ready(self) -> dict:
        """Readiness: answering at all means the constructor, which loads the models, has finished. Says where
        the VAE lives (the memory mode)."""
        return {"deployment": "Postprocessor", "replica": replica_name(),
                "memory": self.pipeline.models.placement.describe()}

    @releases_freed_heap
    async def finish(self, prepared: PreparedRequest, latents: torch.Tensor | list[ray.ObjectRef],
                     key: str) -> PostprocessResult:
        """Encode and upload the mp4 as ``key`` (``storage.keys.result_key``). ``latents``: the tensor, or (the
        Orchestrator's way) :func:`~deployments.runtime.transport.put_tensor`'s reference, read in place from the
        object store."""
        if isinstance(latents, list):
            latents = await take_tensor(latents)
        with tempfile.TemporaryDirectory(prefix="stable-avatar-post-") as tmp:
            out = Path(tmp) / "output.mp4"
            async with self._lock:
                result = await asyncio.to_thread(self.pipeline.finish, prepared, latents, out)
            size = await asyncio.to_thread(self.storage.put_file, key, out, "video/mp4")
        return PostprocessResult(key=key, file_size=size, frames=result.frames,
                                 encode_s=result.timings.get("decode_encode", 0.0))

    @releases_freed_heap
    async def finish_segment(self, request_id: str, segment: LatentSegment, latents: list[ray.ObjectRef],
                             width: int, height: int) -> SegmentVideo:
        """Decode and encode one segment of ``request_id``'s video (``latents``: the whole latents' reference,
        read in place; the segment reads its warm-up and its own latents). Returns its video-only mp4, which travels
        back through the object store (a numpy buffer: read in place by ``stitch``)."""
        whole = await take_tensor(latents)
        with tempfile.TemporaryDirectory(prefix="stable-avatar-segment-") as tmp:
            out = Path(tmp) / f"segment-{segment.index:04d}.mp4"
            async with self._lock:
                await self._maybe_crash(segment)
                result = await asyncio.to_thread(self.pipeline.finish_segment, segment, whole, width, height, out)
            data = await asyncio.to_thread(np.fromfile, out, np.uint8)
        return SegmentVideo(index=segment.index, frames=result.frames, data=data,
                            decode_encode_s=result.timings["decode_encode"], replica=replica_name())

    @releases_freed_heap
    async def stitch(self, prepared: PreparedRequest, segments: list[LatentSegment], videos: list[ray.ObjectRef],
                     audio_track: np.ndarray, key: str) -> PostprocessResult:
        """Join the segments' mp4s (``videos[i]``: the reference to ``finish_segment``'s answer for
        ``segments[i]``) and ``audio_track`` (the request's audio-only mp4, uint8, read in place from the object
        store) into one mp4, copying both, and upload it as ``key``."""
        with tempfile.TemporaryDirectory(prefix="stable-avatar-stitch-") as tmp:
            track = Path(tmp) / "audio.m4a"
            await asyncio.to_thread(audio_track.tofile, track)
            files = []
            for segment, ref in zip(segments, videos, strict=True):
                video: SegmentVideo = await ref
                if (video.index, video.frames) != (segment.index, segment.frames):
                    raise ValueError(f"segment {segment.index}: got segment {video.index} with {video.frames} "
                                     f"frames, expected {segment.frames}")
                files.append(Path(tmp) / f"segment-{segment.index:04d}.mp4")
                await asyncio.to_thread(video.data.tofile, files[-1])
                del video
            out = Path(tmp) / "output.mp4"
            result = await asyncio.to_thread(stitch_segments, prepared, segments, files, track, out)
            size = await asyncio.to_thread(self.storage.put_file, key, out, "video/mp4")
        return PostprocessResult(key=key, file_size=size, frames=result.frames,
                                 encode_s=result.timings.get("stitch", 0.0))

    async def _maybe_crash(self, segment: LatentSegment) -> None:
        """Test hook: the replica that received the segment named in the crash file exits while holding it."""
        if self._crash_file is not None and await asyncio.to_thread(self._claim_crash, segment.index):
            await asyncio.sleep(CRASH_DELAY_S)
            os._exit(1)

    def _claim_crash(self, index: int) -> bool:
        try:
            wanted = json.loads(self._crash_file.read_text())["segment"]
            if wanted != index:
                return False
            self._crash_file.rename(self._crash_file.with_suffix(".claimed"))  # exactly one replica claims it
        except (OSError, ValueError, KeyError):  # none (left), being written, or claimed by another replica
            return False
        return True
