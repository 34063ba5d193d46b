"""The in-process StableAvatar pipeline: prepare (media + conditioning) -> denoise (windows) -> finish (mp4).

The three stages are separate methods with explicit inputs and outputs, because the service runs them in three
different deployments (Preprocessor, Denoiser replicas driven by the Orchestrator, Postprocessor).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.conditioning import build_clip_context, build_y
from pipeline.denoise import (
    GuidanceScales,
    InProcessExecutor,
    RequestConditioning,
    StepCallback,
    WindowDenoiser,
    WindowStepExecutor,
    denoise,
    initial_noise,
)
from pipeline.loading import ModelBundle
from pipeline.media.audio import decode_audio
from pipeline.media.audio_track import encode_audio_track
from pipeline.media.errors import MediaError
from pipeline.media.image import choose_size, load_image, resize_cover
from pipeline.media.stitch import stitch_videos
from pipeline.media.video import VideoWriter
from pipeline.models.audio_encoder import audio_features
from pipeline.models.vae import StreamingVaeDecoder, decoder_reach, frames_to_uint8
from pipeline.prompt_cache import PromptEmbeddingCache
from pipeline.reference_cache import ReferenceConditioningCache, reference_key
from pipeline.request import PATCH, VAE_SPATIAL, GenerationParams, PreparedRequest, video_seconds
from pipeline.schema import resolve_seed
from pipeline.segment_plan import DecoderReach, LatentSegment, plan_segments
from pipeline.settings import PipelineSettings
from pipeline.step_cache import StepCache, StepCachePlan
from pipeline.text import PromptEncoder
from pipeline.windows import FPS, SAMPLE_RATE, plan_windows


@dataclass
class VideoResult:
    path: Path
    frames: int
    width: int
    height: int
    file_size: int
    timings: dict[str, float] = field(default_factory=dict)


ProgressCallback = Callable[[str], None]


class StableAvatarPipeline:
    """Holds the loaded components; each stage uses only the ones it needs."""

    def __init__(self, models: ModelBundle, settings: PipelineSettings | None = None):
        self.models = models
        self.settings = settings or PipelineSettings()
        self._prompt_encoder: PromptEncoder | None = None
        self._window_denoiser: WindowDenoiser | None = None
        self.prompt_cache = PromptEmbeddingCache(self.settings.prompt_cache_bytes)
        self.reference_cache = ReferenceConditioningCache(self.settings.reference_cache_bytes)

    @property
    def prompt_encoder(self) -> PromptEncoder:
        if self._prompt_encoder is None:
            self._prompt_encoder = PromptEncoder(
                self.models.tokenizer, self.models.text_encoder, self.settings.negative_prompt, self.prompt_cache)
        return self._prompt_encoder

    # -- stage 1: preprocess --------------------------------------------------------------------------------
    def prepare(self, image: bytes | Path | Image.Image, audio: bytes | Path, params: GenerationParams,
                request_id: str | None = None, progress: ProgressCallback | None = None,
                samples: np.ndarray | None = None) -> PreparedRequest:
        """``image`` may be already loaded and ``samples`` already decoded (16 kHz mono) by validation, so
        neither is decoded twice. An audio length no window plan can cover is an ``audio_url`` error. Under
        ``model_offload`` the encoders go back to host memory at the end, T5 included."""
        try:
            return self._prepare(image, audio, params, request_id, progress, samples)
        finally:
            self.models.release()

    @torch.no_grad()
    def _prepare(self, image: bytes | Path | Image.Image, audio: bytes | Path, params: GenerationParams,
                 request_id: str | None, progress: ProgressCallback | None,
                 samples: np.ndarray | None) -> PreparedRequest:
        timings: dict[str, float] = {}
        say = progress or (lambda _msg: None)
        models, settings = self.models, self.settings

        started = time.perf_counter()
        audio_bytes = audio.read_bytes() if isinstance(audio, Path) else audio
        if samples is None:
            samples = decode_audio(audio_bytes, SAMPLE_RATE)  # [n] float32 mono 16 kHz
        try:
            plan = plan_windows(len(samples), settings.overlap, settings.window_policy,
                                settings.audio_window_frames)
        except ValueError as exc:  # empty audio, or too short for the upstream policy
            raise MediaError(str(exc), field="audio_url") from None
        padded = np.zeros(plan.padded_audio_samples, dtype=np.float32)
        padded[: len(samples)] = samples
        features = [
            audio_features(models.audio_encoder, models.feature_extractor, padded[w.audio_start:w.audio_end])
            for w in plan.windows
        ]  # per window: [1, N_k, audio_dim], computed once per request
        timings["audio"] = time.perf_counter() - started
        seconds = len(samples) / SAMPLE_RATE
        say(f"decoded audio {seconds:.2f} s: {plan.output_frames} frames, {plan.num_windows} windows")

        started = time.perf_counter()
        picture = image if isinstance(image, Image.Image) else load_image(image)
        width, height = choose_size(params.aspect_ratio, picture.width, picture.height, models.preset.resolutions)
        image_u8 = resize_cover(picture, width, height)  # [H, W, 3] uint8
        y, clip_context, cached = self._reference_conditioning(image_u8)
        timings["image"] = time.perf_counter() - started
        say(f"conditioned on the image at {width}x{height}" + (" (reference cache hit)" if cached else ""))

        started = time.perf_counter()
        positive = self.prompt_encoder.encode(params.prompt)
        negative = self.prompt_encoder.negative()
        timings["text"] = time.perf_counter() - started

        tokens_per_frame = (height // VAE_SPATIAL // PATCH) * (width // VAE_SPATIAL // PATCH)
        conditioning = RequestConditioning(
            request_id=request_id or uuid.uuid4().hex,
            text_positive=positive.cpu(), text_negative=negative.cpu(), clip_context=clip_context.cpu(),
            y=y.cpu(), audio_features=[f.cpu() for f in features], seq_len=tokens_per_frame * 21,
            num_steps=params.num_inference_steps, text_scale=params.guidance_scale,
            audio_scale=params.audio_guidance_scale,
        )
        return PreparedRequest(
            request_id=conditioning.request_id, seed=resolve_seed(params.seed), width=width, height=height,
            plan=plan, conditioning=conditioning, audio_bytes=audio_bytes, audio_seconds=seconds, timings=timings,
            acceleration=params.acceleration or settings.acceleration,
        )

    def _reference_conditioning(self, image_u8: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(y [1, 20, 21, h, w], CLIP tokens [1, 257, image_dim], whether the reference cache held them)."""
        key = reference_key(image_u8)
        cached = self.reference_cache.get(key)
        if cached is not None:
            y, clip_context = cached
            return y, clip_context, True
        y, clip_context = self.reference_cache.put(key, (build_y(self.models.vae, image_u8),
                                                         build_clip_context(self.models.image_encoder, image_u8)))
        return y, clip_context, False

    # -- stage 2: denoise -----------------------------------------------------------------------------------
    def initial_latents(self, prepared: PreparedRequest) -> torch.Tensor:
        return initial_noise(prepared.seed, prepared.latent_shape, self.models.state_dtype)

    @property
    def window_denoiser(self) -> WindowDenoiser:
        if self._window_denoiser is None:
            self._window_denoiser = WindowDenoiser(self.models.transformer, compile=self.settings.compile)
        return self._window_denoiser

    def in_process_executor(self, prepared: PreparedRequest) -> InProcessExecutor:
        return InProcessExecutor(self.window_denoiser, prepared.conditioning,
                                 step_cache=StepCache.from_settings(self.settings.step_cache))

    def step_cache_plan(self, prepared: PreparedRequest) -> StepCachePlan | None:
        """The request's skip plan (``None`` at acceleration ``"none"``: the step cache is not entered)."""
        return self.window_denoiser.step_cache_plan(prepared.conditioning.num_steps, prepared.acceleration,
                                                    self.settings.step_cache)

    def guidance_split(self, prepared: PreparedRequest) -> GuidanceScales | None:
        """The scales the loop combines split rows with, or ``None`` for batch-3 units."""
        if not self.settings.split_guidance_rows:
            return None
        cond = prepared.conditioning
        return GuidanceScales(text_scale=cond.text_scale, audio_scale=cond.audio_scale)

    async def denoise(self, prepared: PreparedRequest, executor: WindowStepExecutor | None = None,
                      on_step: StepCallback | None = None) -> torch.Tensor:
        started = time.perf_counter()
        executor = executor or self.in_process_executor(prepared)
        try:
            latents = await denoise(
                prepared.plan, self.initial_latents(prepared), prepared.conditioning.num_steps, executor,
                self.settings.weight_scheme, on_step=on_step, split_guidance=self.guidance_split(prepared),
                step_cache=self.step_cache_plan(prepared),
            )
        finally:
            if isinstance(executor, InProcessExecutor):
                executor.step_cache.free(prepared.request_id)
            self.models.release()
        prepared.timings["denoise"] = time.perf_counter() - started
        return latents  # [1, 16, T, h, w]

    # -- stage 3: decode + encode ---------------------------------------------------------------------------
    def finish(self, prepared: PreparedRequest, latents: torch.Tensor, out_path: Path,
               progress: ProgressCallback | None = None) -> VideoResult:
        """Stream-decode the latents chunk by chunk into ffmpeg. Besides ``latents`` (read, never copied whole),
        memory does not grow with the video length: one chunk at a time is converted to fp32 and decoded."""
        try:
            return self._finish(prepared, latents, out_path, progress)
        finally:
            self.models.release()

    @torch.no_grad()
    def _finish(self, prepared: PreparedRequest, latents: torch.Tensor, out_path: Path,
                progress: ProgressCallback | None) -> VideoResult:
        say = progress or (lambda _msg: None)
        started = time.perf_counter()
        plan = prepared.plan
        latents = latents[:, :, : plan.decoded_latent_frames]  # a view
        decoder = StreamingVaeDecoder(self.models.vae)
        decoder.reset()
        with contextlib.ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stable-avatar-")))
            audio_path = tmp / "audio"
            audio_path.write_bytes(prepared.audio_bytes)
            writer = stack.enter_context(VideoWriter(out_path, prepared.width, prepared.height, fps=FPS,
                                                     audio_path=audio_path, num_frames=plan.output_frames))
            written = 0
            for pixels in self._frames(decoder, latents, plan.output_frames):
                writer.write(pixels)
                written += len(pixels)
        prepared.timings["decode_encode"] = time.perf_counter() - started
        say(f"encoded {written} frames")
        return VideoResult(out_path, written, prepared.width, prepared.height, out_path.stat().st_size,
                           dict(prepared.timings))

    def _frames(self, decoder: StreamingVaeDecoder, latents: torch.Tensor, frames: int) -> Iterator[np.ndarray]:
        """Feed ``latents`` to ``decoder`` chunk by chunk and yield their first ``frames`` frames, uint8
        [f, H, W, 3]. One chunk at a time is converted to fp32 and decoded."""
        chunk = self.settings.decode_chunk_latents
        left = frames
        for start in range(0, latents.shape[2], chunk):
            decoded = decoder.feed(latents[:, :, start:start + chunk].float())  # [1, 3, f, H, W] in [-1, 1]
            pixels = frames_to_uint8(decoded)[:left]  # [f, H, W, 3]
            if len(pixels):
                left -= len(pixels)
                yield pixels

    # -- stage 3 in segments: several replicas decode and encode one long video ------------------------------
    @property
    def decoder_reach(self) -> DecoderReach:
        return decoder_reach(self.models.vae)

    def plan_segments(self, prepared: PreparedRequest, replicas: int,
                      min_segment_latents: int) -> tuple[LatentSegment, ...]:
        """:func:`~pipeline.segment_plan.plan_segments` for this request's decoded latents and this VAE."""
        plan = prepared.plan
        return plan_segments(plan.decoded_latent_frames, replicas, min_segment_latents, self.decoder_reach,
                             plan.output_frames)

    @torch.no_grad()
    def segment_frames(self, segment: LatentSegment, latents: torch.Tensor) -> Iterator[np.ndarray]:
        """The frames of one segment, uint8 [f, H, W, 3] chunks: its warm-up primes the decoder, then its own
        latents are decoded. Bit-identical to the same frames of the serial stream (:meth:`finish`).
        ``latents``: the whole latents [1,16,T,h,w], or only the segment's ``latents[:, :, segment.latents]``."""
        latents = segment_latents(latents, segment)
        decoder = StreamingVaeDecoder(self.models.vae)
        try:
            decoder.warm_up(latents[:, :, : segment.warm_up])
            yield from self._frames(decoder, latents[:, :, segment.warm_up:], segment.frames)
        finally:
            decoder.close()

    def finish_segment(self, segment: LatentSegment, latents: torch.Tensor, width: int, height: int,
                       out_path: Path) -> VideoResult:
        """Encode :meth:`segment_frames` to a video-only H.264 mp4 at ``out_path`` with the serial path's encoder
        settings, for :func:`stitch_segments`."""
        started = time.perf_counter()
        written = 0
        with VideoWriter(out_path, width, height, fps=FPS, num_frames=segment.frames) as writer:
            for pixels in self.segment_frames(segment, latents):
                writer.write(pixels)
                written += len(pixels)
        return VideoResult(out_path, written, width, height, out_path.stat().st_size,
                           {"decode_encode": time.perf_counter() - started})

    def finish_in_segments(self, prepared: PreparedRequest, latents: torch.Tensor, out_path: Path,
                           replicas: int, min_segment_latents: int) -> VideoResult:
        """What the Orchestrator and the Postprocessor replicas do together, one thing after another in this
        process: plan, encode the audio track, decode and encode each segment, stitch. One segment is
        :meth:`finish` itself (the same bytes)."""
        segments = self.plan_segments(prepared, replicas, min_segment_latents)
        if len(segments) == 1:
            return self.finish(prepared, latents, out_path)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="stable-avatar-segments-") as tmp:
            audio = Path(tmp) / "audio"
            audio.write_bytes(prepared.audio_bytes)
            track = encode_audio_track(audio, video_seconds(prepared), Path(tmp) / "audio.m4a")
            files = [self.finish_segment(segment, latents, prepared.width, prepared.height,
                                         Path(tmp) / f"segment-{segment.index:04d}.mp4").path
                     for segment in segments]
            result = stitch_segments(prepared, segments, files, track, out_path)
        prepared.timings["decode_encode"] = time.perf_counter() - started
        result.timings = dict(prepared.timings)
        return result

    async def generate(self, image: bytes | Path, audio: bytes | Path, params: GenerationParams, out_path: Path,
                       executor_factory: Callable[[PreparedRequest], WindowStepExecutor] | None = None,
                       progress: ProgressCallback | None = None) -> tuple[PreparedRequest, VideoResult]:
        prepared = self.prepare(image, audio, params, progress=progress)
        executor = executor_factory(prepared) if executor_factory else None
        latents = await self.denoise(prepared, executor)
        return prepared, self.finish(prepared, latents, out_path, progress=progress)


def segment_latents(latents: torch.Tensor, segment: LatentSegment) -> torch.Tensor:
    """The latent frames ``segment`` reads (a view): from the whole latents [1,16,T,h,w], or ``latents`` already
    are exactly those (``latents[:, :, segment.latents]``)."""
    count = latents.shape[2]
    if count >= segment.end:
        return latents[:, :, segment.latents]
    if count == segment.end - segment.warm_up_start:
        return latents
    raise ValueError(f"segment {segment.index} reads latents {segment.warm_up_start}..{segment.end - 1}; got "
                     f"{count} latent frames, neither the whole latents nor exactly those")


def stitch_segments(prepared: PreparedRequest, segments: Sequence[LatentSegment], files: Sequence[Path],
                    audio_track: Path, out_path: Path) -> VideoResult:
    """Join the segments' mp4s (``files[i]`` from :meth:`StableAvatarPipeline.finish_segment` of ``segments[i]``)
    into the final mp4 at ``out_path``, with the request's ``audio_track`` (:func:`encode_audio_track` of
    :func:`video_seconds`) copied in: the serial path's frame count, duration, streams and audio packets. The
    segments must cover the video's frames once, in order."""
    started = time.perf_counter()
    frames = prepared.plan.output_frames
    bounds = [(s.frame_start, s.frame_end) for s in segments]
    edges = [0, *(end for _, end in bounds)]
    if len(files) != len(segments) or [start for start, _ in bounds] != edges[:-1] or edges[-1] != frames:
        raise ValueError(f"segments {bounds} with {len(files)} files do not cover frames 0..{frames - 1} in order")
    stitch_videos(files, [s.frames for s in segments], audio_track, out_path, FPS)
    return VideoResult(out_path, frames, prepared.width, prepared.height, out_path.stat().st_size,
                       {"stitch": time.perf_counter() - started})
