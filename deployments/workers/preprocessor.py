"""Preprocessor: fetch the inputs, decode audio, wav2vec per window, image conditioning (CLIP + VAE), T5.

Inputs are untrusted: objects in our own storage are read only when the Gateway resolved them to keys at submit
(``stored``: the job's own ``data:`` inputs, the caller's uploads); URLs go through :func:`guarded_fetch.fetch_input` (SSRF guard, size and time limits) and
the bytes through :mod:`pipeline.media.validate` before the models see them, image first (cheap) so a bad image
is refused before a large audio file is downloaded. Every refusal is an ``InputError`` naming the field.

Each replica keeps the pipeline's prompt-embedding cache (``pipeline.prompt_cache_bytes``, LRU by prompt text) and
reference-image cache (``pipeline.reference_cache_bytes``, LRU by the resized image's pixels), so a prompt or an
avatar reused across requests costs one T5 forward, or one VAE encode and CLIP forward, per replica; their counters
go to the metrics after every request.

It also answers the application's model fingerprint (:mod:`deployments.runtime.fingerprint`): it sees the weights,
which the Orchestrators and Gateways (CPU pods) may not, and unlike the Denoisers it does not scale to zero.
"""

from __future__ import annotations

import asyncio
import time

from ray import serve

from deployments.config import AppArgs
from deployments.runtime.fingerprint import model_fingerprint
from deployments.runtime.metrics import CacheMetrics
from deployments.runtime.replica import releases_freed_heap, replica_name
from deployments.storage import StorageNotFoundError, StorageTooLargeError, make_storage
from deployments.storage.s3_inputs import S3InputReader
from deployments.workers.models import load_replica_models
from guarded_fetch import FetchError, InputField, InputTooLargeError, fetch_input
from pipeline.generator import GenerationParams, PipelineSettings, PreparedRequest, StableAvatarPipeline
from pipeline.media.errors import MediaError
from pipeline.media.validate import check_audio, validate_image
from pipeline.schema import StableAvatarInput


@serve.deployment(name="Preprocessor")
class Preprocessor:
    def __init__(self, args: AppArgs):
        bundle = load_replica_models(args, args.preprocessor,
                                     ["vae", "text_encoder", "image_encoder", "audio_encoder"])
        self.pipeline = StableAvatarPipeline(bundle, PipelineSettings.model_validate(args.pipeline.model_dump()))
        self._lock = asyncio.Lock()  # the VAE keeps a causal cache on the module: one request at a time
        self.storage = make_storage(args.storage)
        self.inputs = args.inputs
        self.guard = args.inputs.guard()
        self.s3_inputs = S3InputReader(self.storage)
        self.caches = {name: (cache, CacheMetrics(name)) for name, cache in (
            ("prompt", self.pipeline.prompt_cache), ("reference", self.pipeline.reference_cache))}
        self._report_caches()
        self.fingerprint = model_fingerprint(args)

    def ready(self) -> dict:
        """Readiness: answering at all means the constructor, which loads the models, has finished. Says where
        the models live (the memory mode) and what the prompt and reference caches hold."""
        return {"deployment": "Preprocessor", "replica": replica_name(),
                "memory": self.pipeline.models.placement.describe(),
                **{f"{name}_cache": cache.stats.as_dict() for name, (cache, _) in self.caches.items()}}

    def _report_caches(self) -> None:
        for cache, metrics in self.caches.values():
            metrics.report(cache.stats.as_dict())

    def model_fingerprint(self) -> str:
        return self.fingerprint

    def _read(self, url: str, field: InputField, key: str | None) -> bytes:
        """``key``: the object in our storage that stands for this field (a stored ``data:`` URI, an upload),
        resolved and checked by the Gateway at submit: read directly. Anything else is fetched."""
        limit = self.inputs.fetch.max_bytes(field)
        if key is None:
            return fetch_input(url, field, self.inputs.fetch, self.guard,
                               read_s3=lambda bucket, key: self.s3_inputs.read(bucket, key, limit),
                               s3_buckets=self.inputs.s3_input_buckets)
        try:
            data = self.storage.get_bytes(key, max_bytes=limit)
        except StorageNotFoundError:
            raise MediaError("the stored or uploaded file does not exist (or has expired)", field=field) from None
        except StorageTooLargeError:
            raise InputTooLargeError(f"{field} is too large: more than the limit of {limit} bytes",
                                     field=field) from None
        if not data:
            raise FetchError(f"{field} is empty (0 bytes)", field=field)
        return data

    @releases_freed_heap
    async def prepare(self, request_id: str, request: StableAvatarInput, seed: int | None = None,
                      stored: dict[str, str] | None = None) -> PreparedRequest:
        """``stored`` maps fields to the storage keys that stand for them (``JobInput.stored``)."""
        notes: list[str] = []
        stored = stored or {}
        started = time.perf_counter()
        media = self.inputs.media
        image = await asyncio.to_thread(self._read, request.image_url, "image_url", stored.get("image_url"))
        fetch_s = time.perf_counter() - started
        picture = await asyncio.to_thread(validate_image, image, media)
        started_audio = time.perf_counter()
        audio = await asyncio.to_thread(self._read, request.audio_url, "audio_url", stored.get("audio_url"))
        fetch_s += time.perf_counter() - started_audio
        checked = await asyncio.to_thread(check_audio, audio, media)
        notes.append(f"downloaded image {len(image) / 1e6:.2f} MB and audio {len(audio) / 1e6:.2f} MB "
                     f"in {fetch_s:.1f} s")
        notes.append(f"validated the inputs: image {picture.width}x{picture.height}, audio "
                     f"{checked.duration_s:.2f} s")
        params = GenerationParams(
            prompt=request.prompt, aspect_ratio=request.aspect_ratio, guidance_scale=request.guidance_scale,
            audio_guidance_scale=request.audio_guidance_scale, num_inference_steps=request.num_inference_steps,
            seed=request.seed if seed is None else seed, acceleration=request.acceleration,
        )
        async with self._lock:
            try:
                prepared = await asyncio.to_thread(self.pipeline.prepare, picture, audio, params, request_id,
                                                   notes.append, checked.samples)
            finally:
                self._report_caches()
        prepared.notes = notes
        prepared.input_bytes = len(image) + len(audio)
        return prepared
