"""Orchestrator: runs one job (prepare -> denoise loop over Denoiser replicas -> finish), async.

The denoising loop is the pipeline's own ``denoise``; only the executor differs from the CLI, which is why the
service's output is bit-identical to ``stable-avatar generate``. Fused latents are checkpointed to storage every
few steps, so a job whose Orchestrator died resumes where it was instead of starting over.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import ray
import torch
from ray import serve

from deployments import metrics
from deployments.config import AppArgs
from deployments.placement import request_offset
from deployments.ray_executor import RayDenoiserExecutor
from deployments.results import public_result, stored_output
from deployments.storage import make_storage
from deployments.units import UnitPlan, unit_plan
from pipeline.denoise import WindowStep, denoise, initial_noise
from pipeline.generator import PreparedRequest, resolve_seed
from pipeline.media.errors import MediaError
from pipeline.schema import StableAvatarInput, StableAvatarOutput
from pipeline.windows import FPS

logger = logging.getLogger("ray.serve")
PROGRESS_KEEP = 1000  # finished jobs whose progress stays readable here


@dataclass
class JobProgress:
    """What a client can follow while a job runs: stage, step counts and human log lines."""

    stage: str = "queued"
    step: int = 0
    total_steps: int = 0
    windows: int = 0
    logs: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        fraction = self.step / self.total_steps if self.total_steps else 0.0
        return {"stage": self.stage, "step": self.step, "total_steps": self.total_steps, "windows": self.windows,
                "progress": 1.0 if self.stage == "completed" else round(fraction, 4), "logs": list(self.logs)}


class Reporter:
    """Progress sink of one run: in-memory for the sync route, forwarded to the JobQueue for queued jobs."""

    def __init__(self, progress: JobProgress, job_queue=None, request_id: str = ""):
        self.progress, self.job_queue, self.request_id = progress, job_queue, request_id

    async def __call__(self, stage: str | None = None, message: str | None = None, level: str = "INFO") -> None:
        p = self.progress
        if stage:
            p.stage = stage
        if message:
            p.logs.append(message)
            logger.info("%s: %s", self.request_id, message)
        if self.job_queue is not None:
            fraction = p.step / p.total_steps if p.total_steps else 0.0
            cancelled = await self.job_queue.report.remote(self.request_id, stage, fraction, message, level)
            if cancelled:
                raise asyncio.CancelledError("the job was cancelled")


@serve.deployment(name="Orchestrator", max_ongoing_requests=64)
class Orchestrator:
    def __init__(self, preprocessor, denoiser, postprocessor, args: AppArgs):
        self.preprocessor, self.denoiser, self.postprocessor = preprocessor, denoiser, postprocessor
        self.args = args
        self.storage = make_storage(args.storage)
        self.state_dtype = args.state_dtype()  # from the config: this CPU replica must agree with the Denoisers
        self.progress: OrderedDict[str, JobProgress] = OrderedDict()
        self.active: dict[str, asyncio.Task] = {}
        self._background: set[asyncio.Task] = set()
        threads = args.model_preset().torch_threads
        if threads is not None:
            torch.set_num_threads(threads)

    def _job_queue(self):
        return serve.get_deployment_handle("JobQueue", serve.get_replica_context().app_name)

    def _track(self, request_id: str) -> JobProgress:
        while len(self.progress) >= PROGRESS_KEEP:
            self.progress.popitem(last=False)
        self.progress[request_id] = JobProgress()
        return self.progress[request_id]

    # -- entry points ------------------------------------------------------------------------------------------
    async def generate(self, request: StableAvatarInput, request_id: str | None = None,
                       owner: str = "") -> StableAvatarOutput:
        """Synchronous generation (sync HTTP route and the Python handle); no queue, no checkpoints."""
        self._check_upload_owner(request, owner)
        request_id = request_id or uuid.uuid4().hex
        seed = resolve_seed(request.seed)
        reporter = Reporter(self._track(request_id), None, request_id)
        try:
            result = await self._execute(request_id, request, seed, reporter, checkpoints=False)
        except BaseException as exc:
            reporter.progress.stage = "failed"
            reporter.progress.logs.append(f"failed: {type(exc).__name__}: {exc}")
            raise
        reporter.progress.stage = "completed"
        return StableAvatarOutput.model_validate(public_result(result, self.storage))

    async def run_job(self, request_id: str, request: StableAvatarInput, seed: int, owner: str = "") -> dict:
        """Run a queued job; a second call for a job still running here joins the first run."""
        self._check_upload_owner(request, owner)
        task = self.active.get(request_id)
        if task is None or task.done():
            reporter = Reporter(self._track(request_id), self._job_queue(), request_id)
            task = asyncio.get_running_loop().create_task(
                self._execute(request_id, request, seed, reporter, checkpoints=True))
            self.active[request_id] = task
            task.add_done_callback(lambda _t: self.active.pop(request_id, None))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.cancel()  # the caller cancelled the job: stop at the next step boundary
            raise

    def _check_upload_owner(self, request: StableAvatarInput, owner: str) -> None:
        """Files uploaded with one API key are not inputs for another key's jobs."""
        for field_name in ("image_url", "audio_url"):
            key = self.storage.key_for_url(getattr(request, field_name))
            if key is not None and key.startswith("uploads/") and key.split("/")[1] != (owner or "public"):
                raise MediaError("the uploaded file was not found", field=field_name)

    def get_progress(self, request_id: str) -> dict | None:
        progress = self.progress.get(request_id)
        return progress.as_dict() if progress else None

    def ping(self) -> bool:
        return True

    # -- one run -----------------------------------------------------------------------------------------------
    async def _execute(self, request_id: str, request: StableAvatarInput, seed: int, report: Reporter,
                       checkpoints: bool) -> dict:
        started = time.perf_counter()
        await report(stage="preprocessing", message="preprocessing: fetching and decoding the inputs")
        prepared: PreparedRequest = await self.preprocessor.prepare.remote(request_id, request, seed)
        metrics.stage_duration().observe(time.perf_counter() - started, tags={"stage": "preprocess"})
        metrics.bytes_total().inc(prepared.input_bytes, tags={"direction": "downloaded"})
        plan, progress = prepared.plan, report.progress
        progress.windows, progress.total_steps = plan.num_windows, prepared.conditioning.num_steps
        for note in prepared.notes:
            await report(message=note)
        await report(message=f"prepared in {time.perf_counter() - started:.1f} s: {prepared.width}x{prepared.height}"
                             f", {plan.output_frames} frames, {plan.num_windows} windows x "
                             f"{progress.total_steps} steps")

        latents, start_step = initial_noise(seed, prepared.latent_shape, self.state_dtype), 0
        if checkpoints:
            resumed = await asyncio.to_thread(self._load_checkpoint, request_id, prepared, seed)
            if resumed is not None:
                start_step, latents = resumed
                progress.step = start_step
                await report(message=f"resumed from the checkpoint after step {start_step}/{progress.total_steps}")

        await report(stage="denoising")
        units = await self._unit_plan(request_id, prepared, start_step)
        await report(message=units.describe())
        conditioning_ref = ray.put(prepared.conditioning)
        executor = self._executor(request_id, conditioning_ref, report)
        step_started = [time.perf_counter()]
        every = self.args.checkpoint_every_steps if checkpoints else 0
        last_saved = [start_step - 1]

        async def on_step(step: int, fused: torch.Tensor) -> None:
            progress.step = step + 1
            replicas = len(executor.last_replicas)
            await report(message=f"denoising step {step + 1}/{progress.total_steps}, {plan.num_windows} windows on "
                                 f"{replicas} replica{'s' if replicas != 1 else ''} "
                                 f"({time.perf_counter() - step_started[0]:.2f} s)")
            step_started[0] = time.perf_counter()
            if units.checkpoint_due(step, progress.total_steps, every, last_saved[0]):
                await asyncio.to_thread(self._save_checkpoint, request_id, prepared, seed, step, fused)
                last_saved[0] = step

        denoise_started = time.perf_counter()
        try:
            latents = await denoise(plan, latents, progress.total_steps, executor,
                                    self.args.pipeline.weight_scheme, start_step=start_step, on_step=on_step,
                                    **units.denoise_kwargs())
        except BaseException:
            self._release_later(executor)  # cancelled or failed: the replicas still drop the request's caches
            raise
        await executor.release(self._max_denoisers())
        del conditioning_ref
        metrics.stage_duration().observe(time.perf_counter() - denoise_started, tags={"stage": "denoise"})

        await report(stage="postprocessing", message="decoding and encoding the video")
        post_started = time.perf_counter()
        stored = await self.postprocessor.finish.remote(prepared.without_conditioning(), latents)
        metrics.stage_duration().observe(time.perf_counter() - post_started, tags={"stage": "postprocess"})
        metrics.bytes_total().inc(stored["file_size"], tags={"direction": "uploaded"})
        metrics.output_seconds().inc(stored["frames"] / FPS)
        await report(message=f"encoded {stored['frames']} frames in {stored['encode_s']:.1f} s, uploaded "
                             f"{stored['file_size'] / 1e6:.2f} MB")
        if checkpoints:
            await asyncio.to_thread(self.storage.delete, self._checkpoint_key(request_id))
        return stored_output(stored["key"], stored["file_size"], seed)

    # -- units: what the Denoisers run for this request (settings from args.pipeline, as the CLI) -------------
    async def _unit_plan(self, request_id: str, prepared: PreparedRequest, start_step: int) -> UnitPlan:
        cond, level = prepared.conditioning, prepared.acceleration
        step_cache = None
        if level != "none":  # the plan needs the DiT's timestep modulation: any Denoiser replica computes it
            step_cache = await self.denoiser.step_cache_plan.remote(request_id, request_offset(request_id),
                                                                    cond.num_steps, level)
        return unit_plan(self.args.pipeline, cond, level, step_cache, start_step)

    def _executor(self, request_id: str, conditioning_ref: ray.ObjectRef, report: Reporter) -> RayDenoiserExecutor:
        retries = self.args.window_step_retries

        async def on_retry(work: WindowStep, attempt: int, error: BaseException) -> None:
            await report(message=f"window {work.window} step {work.step + 1} rows {list(work.rows)}: its Denoiser "
                                 f"replica failed ({type(error).__name__}); retrying ({attempt}/{retries})",
                         level="WARN")

        return RayDenoiserExecutor(self.denoiser, conditioning_ref, request_id, retries, on_retry=on_retry)

    def _max_denoisers(self) -> int:
        options = self.args.denoiser
        return options.autoscaling.max_replicas if options.autoscaling is not None else options.num_replicas

    def _release_later(self, executor: RayDenoiserExecutor) -> None:
        task = asyncio.get_running_loop().create_task(executor.release(self._max_denoisers()))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- checkpoints -------------------------------------------------------------------------------------------
    @staticmethod
    def _checkpoint_key(request_id: str) -> str:
        return f"checkpoints/{request_id}/latents.pt"

    def _save_checkpoint(self, request_id: str, prepared: PreparedRequest, seed: int, step: int,
                         latents: torch.Tensor) -> None:
        buffer = io.BytesIO()
        torch.save({"step": step, "seed": seed, "shape": list(prepared.latent_shape), "latents": latents,
                    "num_steps": prepared.conditioning.num_steps}, buffer)
        self.storage.put_bytes(self._checkpoint_key(request_id), buffer.getvalue(), "application/octet-stream")

    def _load_checkpoint(self, request_id: str, prepared: PreparedRequest,
                         seed: int) -> tuple[int, torch.Tensor] | None:
        key = self._checkpoint_key(request_id)
        if not self.storage.exists(key):
            return None
        state = torch.load(io.BytesIO(self.storage.get_bytes(key)), weights_only=True)
        if (state["seed"], state["shape"], state["num_steps"]) != (
                seed, list(prepared.latent_shape), prepared.conditioning.num_steps):
            return None
        return state["step"] + 1, state["latents"].to(self.state_dtype)
