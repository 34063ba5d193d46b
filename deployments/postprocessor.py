"""Postprocessor: streaming VAE decode into ffmpeg (H.264 + AAC) and upload of the mp4 to storage."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import torch
from ray import serve

from deployments.common import load_replica_models
from deployments.config import AppArgs
from deployments.storage import make_storage
from pipeline.generator import PipelineSettings, PreparedRequest, StableAvatarPipeline


def result_key(request_id: str) -> str:
    return f"results/{request_id}/output.mp4"


@serve.deployment(name="Postprocessor")
class Postprocessor:
    def __init__(self, args: AppArgs):
        bundle = load_replica_models(args, args.postprocessor, ["vae"])
        self.pipeline = StableAvatarPipeline(bundle, PipelineSettings.model_validate(args.pipeline.model_dump()))
        self.storage = make_storage(args.storage)
        self._lock = asyncio.Lock()  # one streaming decode per VAE at a time

    async def finish(self, prepared: PreparedRequest, latents: torch.Tensor) -> dict:
        """Returns ``{"key", "file_size", "frames", "encode_s"}`` of the uploaded mp4."""
        with tempfile.TemporaryDirectory(prefix="stable-avatar-post-") as tmp:
            out = Path(tmp) / "output.mp4"
            async with self._lock:
                result = await asyncio.to_thread(self.pipeline.finish, prepared, latents, out)
            key = result_key(prepared.request_id)
            size = await asyncio.to_thread(self.storage.put_file, key, out, "video/mp4")
        return {"key": key, "file_size": size, "frames": result.frames,
                "encode_s": result.timings.get("decode_encode", 0.0)}
