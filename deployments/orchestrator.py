"""Orchestrator: runs one job (prepare -> denoise loop over Denoiser replicas -> finish), async.

The denoising loop is the pipeline's own ``denoise``; only the executor differs from the CLI, which is why the
service's output is bit-identical to ``stable-avatar generate``.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

import ray
import torch
from ray import serve

from deployments.config import AppArgs
from deployments.ray_executor import RayDenoiserExecutor
from pipeline.denoise import denoise, initial_noise
from pipeline.generator import PreparedRequest
from pipeline.presets import get_preset
from pipeline.schema import StableAvatarInput, StableAvatarOutput

logger = logging.getLogger("ray.serve")
PROGRESS_KEEP = 1000  # finished jobs whose progress stays readable


@dataclass
class JobProgress:
    """What a client can follow while a job runs: stage, step counts and human log lines."""

    stage: str = "queued"
    step: int = 0
    total_steps: int = 0
    windows: int = 0
    logs: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def log(self, message: str) -> None:
        self.logs.append(message)
        logger.info(message)

    def as_dict(self) -> dict:
        fraction = self.step / self.total_steps if self.total_steps else 0.0
        return {"stage": self.stage, "step": self.step, "total_steps": self.total_steps, "windows": self.windows,
                "progress": 1.0 if self.stage == "completed" else round(fraction, 4), "logs": list(self.logs)}


@serve.deployment(name="Orchestrator", max_ongoing_requests=16)
class Orchestrator:
    def __init__(self, preprocessor, denoiser, postprocessor, args: AppArgs):
        self.preprocessor, self.denoiser, self.postprocessor = preprocessor, denoiser, postprocessor
        self.args = args
        self.state_dtype = torch.float32 if args.torch_device(args.denoiser.num_gpus) == "cpu" else torch.bfloat16
        self.progress: dict[str, JobProgress] = {}
        if get_preset(args.preset).torch_threads is not None:
            torch.set_num_threads(get_preset(args.preset).torch_threads)

    def _track(self, request_id: str) -> JobProgress:
        while len(self.progress) >= PROGRESS_KEEP:
            self.progress.pop(next(iter(self.progress)))
        self.progress[request_id] = JobProgress()
        return self.progress[request_id]

    async def generate(self, request: StableAvatarInput, request_id: str | None = None) -> StableAvatarOutput:
        request_id = request_id or uuid.uuid4().hex
        progress = self._track(request_id)
        try:
            output = await self._run(request, request_id, progress)
        except BaseException as exc:
            progress.stage = "failed"
            progress.log(f"failed: {type(exc).__name__}: {exc}")
            raise
        progress.stage = "completed"
        return output

    async def _run(self, request: StableAvatarInput, request_id: str, progress: JobProgress) -> StableAvatarOutput:
        started = time.perf_counter()
        progress.stage = "preprocessing"
        prepared: PreparedRequest = await self.preprocessor.prepare.remote(request_id, request)
        plan = prepared.plan
        progress.windows, progress.total_steps = plan.num_windows, prepared.conditioning.num_steps
        progress.log(f"prepared in {time.perf_counter() - started:.1f} s: {prepared.audio_seconds:.2f} s of audio, "
                     f"{prepared.width}x{prepared.height}, {plan.output_frames} frames, {plan.num_windows} windows")

        progress.stage = "denoising"
        conditioning_ref = ray.put(prepared.conditioning)
        executor = RayDenoiserExecutor(
            self.denoiser, conditioning_ref, request_id, self.args.window_step_retries,
            on_retry=lambda w, n, exc: progress.log(f"window {w.window} step {w.step + 1}: replica lost "
                                                    f"({type(exc).__name__}), retry {n}"))
        latents = initial_noise(prepared.seed, prepared.latent_shape, self.state_dtype)
        step_started = time.perf_counter()

        def on_step(step: int, _latents: torch.Tensor) -> None:
            progress.step = step + 1
            progress.log(f"denoising step {step + 1}/{progress.total_steps}, {plan.num_windows} windows "
                         f"({time.perf_counter() - step_started:.1f} s)")

        latents = await denoise(plan, latents, progress.total_steps, executor,
                                self.args.pipeline.weight_scheme, on_step=on_step)
        del conditioning_ref

        progress.stage = "postprocessing"
        video = await self.postprocessor.finish.remote(prepared.without_conditioning(), latents)
        progress.log(f"encoded {plan.output_frames} frames, uploaded {video.file_size / 2**20:.1f} MB "
                     f"in {time.perf_counter() - started:.1f} s total")
        return StableAvatarOutput(video=video, seed=prepared.seed)

    def get_progress(self, request_id: str) -> dict | None:
        progress = self.progress.get(request_id)
        return progress.as_dict() if progress else None

    def ping(self) -> bool:
        return True
