"""Postprocessor: streaming VAE decode into ffmpeg (H.264 + AAC) and upload of the mp4 to storage."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import ray
import torch
from ray import serve

from deployments.common import replica_name
from deployments.config import AppArgs
from deployments.replica_models import load_replica_models
from deployments.storage import make_storage
from deployments.transport import take_tensor
from pipeline.generator import PipelineSettings, PreparedRequest, StableAvatarPipeline


def result_key(request_id: str, epoch: int) -> str:
    """Where a job's video goes: one folder per claim (epoch), so two runners of one job never overwrite each
    other's object; the one whose completion wins keeps it, the other deletes its own."""
    return f"results/{request_id}/e{epoch}/output.mp4"


@serve.deployment(name="Postprocessor")
class Postprocessor:
    def __init__(self, args: AppArgs):
        bundle = load_replica_models(args, args.postprocessor, ["vae"])
        self.pipeline = StableAvatarPipeline(bundle, PipelineSettings.model_validate(args.pipeline.model_dump()))
        self.storage = make_storage(args.storage)
        self._lock = asyncio.Lock()  # one streaming decode per VAE at a time

    def ready(self) -> dict:
        """Readiness: answering at all means the constructor, which loads the models, has finished."""
        return {"deployment": "Postprocessor", "replica": replica_name()}

    async def finish(self, prepared: PreparedRequest, latents: torch.Tensor | list[ray.ObjectRef], key: str) -> dict:
        """Encode and upload the mp4 as ``key`` (:func:`result_key`); returns ``{"key", "file_size", "frames",
        "encode_s"}``. ``latents``: the tensor, or (the Orchestrator's way) :func:`~deployments.transport.put_tensor`'s
        reference, read in place from the object store."""
        if isinstance(latents, list):
            latents = await take_tensor(latents)
        with tempfile.TemporaryDirectory(prefix="stable-avatar-post-") as tmp:
            out = Path(tmp) / "output.mp4"
            async with self._lock:
                result = await asyncio.to_thread(self.pipeline.finish, prepared, latents, out)
            size = await asyncio.to_thread(self.storage.put_file, key, out, "video/mp4")
        return {"key": key, "file_size": size, "frames": result.frames,
                "encode_s": result.timings.get("decode_encode", 0.0)}
