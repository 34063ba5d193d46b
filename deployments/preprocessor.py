"""Preprocessor: fetch the inputs, decode audio, wav2vec per window, image conditioning (CLIP + VAE), T5."""

from __future__ import annotations

import asyncio
import time

from ray import serve

from deployments.common import load_replica_models
from deployments.config import AppArgs
from deployments.storage import StorageNotFoundError, make_storage
from pipeline.generator import GenerationParams, PipelineSettings, PreparedRequest, StableAvatarPipeline
from pipeline.inputs import read_source
from pipeline.media.errors import MediaError
from pipeline.schema import StableAvatarInput


@serve.deployment(name="Preprocessor")
class Preprocessor:
    def __init__(self, args: AppArgs):
        bundle = load_replica_models(args, args.preprocessor,
                                     ["vae", "text_encoder", "image_encoder", "audio_encoder"])
        self.pipeline = StableAvatarPipeline(bundle, PipelineSettings.model_validate(args.pipeline.model_dump()))
        self._lock = asyncio.Lock()  # the VAE keeps a causal cache on the module: one request at a time
        self.storage = make_storage(args.storage)

    def _read(self, url: str, field: str) -> bytes:
        """Files uploaded to our storage are read directly; otherwise only http(s) and data: URLs."""
        key = self.storage.key_for_url(url)
        if key is not None:
            try:
                return self.storage.get_bytes(key)
            except StorageNotFoundError:
                raise MediaError("the uploaded file does not exist (or has expired)", field=field) from None
        if not url.startswith(("http://", "https://", "data:")):
            raise MediaError("only http(s) URLs, data: URIs and uploaded files are accepted", field=field)
        return read_source(url, field)

    async def prepare(self, request_id: str, request: StableAvatarInput, seed: int | None = None) -> PreparedRequest:
        notes: list[str] = []
        started = time.perf_counter()
        image = await asyncio.to_thread(self._read, request.image_url, "image_url")
        audio = await asyncio.to_thread(self._read, request.audio_url, "audio_url")
        notes.append(f"downloaded image {len(image) / 1e6:.2f} MB and audio {len(audio) / 1e6:.2f} MB "
                     f"in {time.perf_counter() - started:.1f} s")
        params = GenerationParams(
            prompt=request.prompt, aspect_ratio=request.aspect_ratio, guidance_scale=request.guidance_scale,
            audio_guidance_scale=request.audio_guidance_scale, num_inference_steps=request.num_inference_steps,
            seed=request.seed if seed is None else seed,
        )
        async with self._lock:
            prepared = await asyncio.to_thread(self.pipeline.prepare, image, audio, params, request_id,
                                               notes.append)
        prepared.notes = notes
        return prepared
