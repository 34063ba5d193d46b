"""Preprocessor: fetch the inputs, decode audio, wav2vec per window, image conditioning (CLIP + VAE), T5."""

from __future__ import annotations

import asyncio

from ray import serve

from deployments.common import load_replica_models
from deployments.config import AppArgs
from pipeline.generator import GenerationParams, PipelineSettings, PreparedRequest, StableAvatarPipeline
from pipeline.inputs import read_source
from pipeline.schema import StableAvatarInput


@serve.deployment(name="Preprocessor")
class Preprocessor:
    def __init__(self, args: AppArgs):
        bundle = load_replica_models(args, args.preprocessor,
                                     ["vae", "text_encoder", "image_encoder", "audio_encoder"])
        self.pipeline = StableAvatarPipeline(bundle, PipelineSettings.model_validate(args.pipeline.model_dump()))
        self._lock = asyncio.Lock()  # the VAE keeps a causal cache on the module: one request at a time

    async def prepare(self, request_id: str, request: StableAvatarInput) -> PreparedRequest:
        image = await asyncio.to_thread(read_source, request.image_url, "image_url")
        audio = await asyncio.to_thread(read_source, request.audio_url, "audio_url")
        params = GenerationParams(
            prompt=request.prompt, aspect_ratio=request.aspect_ratio, guidance_scale=request.guidance_scale,
            audio_guidance_scale=request.audio_guidance_scale, num_inference_steps=request.num_inference_steps,
            seed=request.seed,
        )
        async with self._lock:
            return await asyncio.to_thread(self.pipeline.prepare, image, audio, params, request_id)
