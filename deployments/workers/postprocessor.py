"""Postprocessor: streaming VAE decode into ffmpeg (H.264 + AAC) and upload of the mp4 to storage."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import ray
import torch
from ray import serve

from deployments.config import AppArgs
from deployments.contracts import PostprocessResult
from deployments.runtime.replica import replica_name
from deployments.runtime.transport import take_tensor
from deployments.storage import make_storage
from deployments.workers.models import load_replica_models
from pipeline.generator import PipelineSettings, PreparedRequest, StableAvatarPipeline


@serve.deployment(name="Postprocessor")
class Postprocessor:
    def __init__(self, args: AppArgs):
        bundle = load_replica_models(args, args.postprocessor, ["vae"])
        self.pipeline = StableAvatarPipeline(bundle, PipelineSettings.model_validate(args.pipeline.model_dump()))
        self.storage = make_storage(args.storage)
        self._lock = asyncio.Lock()  # one streaming decode per VAE at a time

    def ready(self) -> dict:
        """Readiness: answering at all means the constructor, which loads the models, has finished. Says where
        the VAE lives (the memory mode)."""
        return {"deployment": "Postprocessor", "replica": replica_name(),
                "memory": self.pipeline.models.placement.describe()}

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
