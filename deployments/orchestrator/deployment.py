"""Orchestrator: runs jobs (prepare -> denoise loop over Denoiser replicas -> finish), async.

Every replica is a runner (:mod:`deployments.orchestrator.runner`): it claims queued jobs from the jobs database with a
lease, runs the sync route's requests under a lease created with their row, and delivers the webhooks the
database owes (:mod:`deployments.orchestrator.webhook_worker`). Nothing calls back into the Gateway; progress, logs and
results go to the job's row, fenced by the lease's epoch.

The denoising loop is the pipeline's own ``denoise``; only the executor differs from the CLI, which is why the
service's output is bit-identical to ``stable-avatar generate``. Fused latents of queued jobs are checkpointed to
storage every few steps (``checkpoints/<id>/e<epoch>/s<step>/latents.pt``, through the runner), so a job whose
replica died resumes where it was on whichever replica of the same model claims it next.

Every remote call has a timeout (``timeouts:``): a unit that overruns is sent to another Denoiser replica, a
Preprocessor or Postprocessor call that overruns ends the attempt as an infrastructure fault (the job is retried).
Object-store puts (the conditioning, the final latents) and the initial noise, GiB-sized for long videos, are made
in a thread: the event loop keeps renewing leases and claiming while they run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import ray
import torch
from ray import serve

from deployments.config import AppArgs
from deployments.contracts import JobInput, PostprocessResult, StoredResult, StoredVideo, request_offset
from deployments.orchestrator.admission import DenoiseAdmission
from deployments.orchestrator.checkpoints import load_checkpoint, save_checkpoint
from deployments.orchestrator.executor import RETRYABLE, RayDenoiserExecutor
from deployments.orchestrator.faults import StageTimeoutError, UnitTimeoutError
from deployments.orchestrator.retention import RetentionSweeper
from deployments.orchestrator.runner import JobRunner, Run, RunReporter
from deployments.orchestrator.segments import SegmentedFinish
from deployments.orchestrator.units import UnitPlan, unit_plan
from deployments.runtime import metrics
from deployments.runtime.replica import limit_heap_retention, replica_name
from deployments.runtime.service_state import open_service_state
from deployments.runtime.transport import put_tensor
from deployments.storage.keys import result_key
from pipeline.denoise import denoise, initial_noise
from pipeline.request import PreparedRequest
from pipeline.windows import FPS

logger = logging.getLogger("ray.serve")


@serve.deployment(name="Orchestrator", max_ongoing_requests=64)
class Orchestrator:
    def __init__(self, preprocessor, denoiser, postprocessor, args: AppArgs):
        from deployments.orchestrator.webhook_worker import WebhookWorker

        self.preprocessor, self.denoiser, self.postprocessor = preprocessor, denoiser, postprocessor
        self.args = args
        limit_heap_retention()  # units, their outputs and fused states churn through latent-sized buffers
        self.state = open_service_state(args)
        self.store, self.storage = self.state.store, self.state.storage
        self.state_dtype = args.state_dtype()  # from the config: this CPU replica must agree with the Denoisers
        self._background: set[asyncio.Task] = set()  # cache releases that outlive their run
        threads = args.model_preset().torch_threads
        if threads is not None:
            torch.set_num_threads(threads)
        self.runner_id = replica_name()
        self._fingerprint: asyncio.Task | None = None
        self.segmented = SegmentedFinish(postprocessor, args.model_preset(), args.postprocessor.max_replicas,
                                         args.min_segment_latents, args.window_step_retries,
                                         segment_timeout_s=args.timeouts.postprocess_s)
        self.admission = DenoiseAdmission(args.max_running_jobs, args.short_job_slots, args.short_job_rows,
                                          args.admission_ageing_s)
        self.runner = JobRunner(self.store, self.storage, args, self.runner_id, self._execute,
                                model_fingerprint=self.model_fingerprint, may_claim=self.admission.may_claim)
        self.webhooks = WebhookWorker(self.store, self.storage, args, self.runner_id, self.state.webhook_signer)
        # every replica runs the sweeper; a lease row in the jobs database lets one sweep per interval through
        self.retention = RetentionSweeper(self.store, self.storage, args.retention, owner=self.runner_id,
                                          on_report=metrics.record_retention)
        # Serve runs the constructor on the replica's event loop: the loops start with the replica, before any
        # request, so a restarted application resumes its jobs by itself.
        self.loops = {"claim": self.runner.loop, "webhook": self.webhooks.loop, "retention": self.retention.loop}
        for loop in self.loops.values():
            loop.ensure_running()
        logger.info("runner %s: up to %d queued jobs at once, lease %.1f s (heartbeat %.1f s), jobs database %s",
                    self.runner_id, args.max_running_jobs, args.dispatch.lease_s, args.dispatch.heartbeat_s,
                    self.store.backend_name)

    # -- entry points ------------------------------------------------------------------------------------------
    async def run_sync(self, request_id: str, job_input: dict[str, Any], seed: int, owner: str = "",
                       input_keys: list[str] | None = None, rate_limited: bool = True,
                       idempotency_key: str | None = None, body_hash: str | None = None) -> StoredResult:
        """A sync request (``/run`` and the Python handle): its row is created here, already leased to this
        replica, counting as a running job of ``owner`` (``LimitError`` when the key is at a limit; ``rate_limited``
        False: the caller took the key's submit token itself, before it read the request). With an
        ``idempotency_key`` that already started a job, ``AlreadySubmittedError`` names it (the Gateway waits for
        that one). Returns the stored result (video as a storage key); raises what stopped it, after recording
        it on the row."""
        claimed = await self.store.create_sync(
            app_id=self.args.app_id, input=job_input, seed=seed, runner_id=self.runner_id,
            lease_s=self.args.dispatch.lease_s, owner=owner, input_keys=input_keys or [], request_id=request_id,
            rate_limited=rate_limited, model_fingerprint=await self.model_fingerprint(),
            idempotency_key=idempotency_key, body_hash=body_hash)
        return await self.runner.supervise(Run(claimed))

    async def model_fingerprint(self) -> str:
        """The application's model fingerprint (:mod:`deployments.runtime.fingerprint`), as the Preprocessor (which
        sees the weights) computed it; asked once, shared by concurrent callers, asked again after a failure."""
        if self._fingerprint is None or (self._fingerprint.done() and self._fingerprint.exception() is not None):
            self._fingerprint = asyncio.ensure_future(self._ask_fingerprint())
        return await asyncio.shield(self._fingerprint)

    async def _ask_fingerprint(self) -> str:
        async with asyncio.timeout(self.args.timeouts.preprocess_s):
            return await self.preprocessor.model_fingerprint.remote()

    def ready(self) -> dict[str, Any]:
        """Readiness: the replica is constructed (its store open), and its claim and webhook loops run."""
        return {"deployment": "Orchestrator", "replica": self.runner_id, "claiming": self.runner.loop.alive,
                "delivering_webhooks": self.webhooks.loop.alive, "sweeping": self.retention.loop.alive,
                "running": sorted(self.runner.runs)}

    def ping(self) -> bool:
        return True

    async def check_health(self) -> None:
        """Serve's periodic health check: restart a loop that died (it should not), and say so."""
        for name, loop in self.loops.items():
            if loop.ensure_running():
                logger.error("runner %s: the %s loop had stopped; restarted it", self.runner_id, name)

    async def __del__(self) -> None:
        """Graceful shutdown (a redeploy, a scale-down): stop claiming, hand queued jobs back to the queue."""
        await self.webhooks.loop.stop()
        await self.retention.loop.stop()
        await self.runner.stop()

    # -- one run -----------------------------------------------------------------------------------------------
    async def _execute(self, run: Run, report: RunReporter) -> StoredResult:
        job, started = run.job, time.perf_counter()
        job_input = JobInput.model_validate(job.input)
        request, checkpoints = job_input.model(), job.kind == "queue"
        await report(stage="preprocessing", message=f"running on {self.runner_id} (epoch {job.epoch}, attempt "
                                                    f"{job.attempts}); preprocessing: fetching and decoding the "
                                                    "inputs")
        prepared: PreparedRequest = await self._call_stage(
            "Preprocessor", lambda: self.preprocessor.prepare.remote(job.request_id, request, job.seed,
                                                                     job_input.stored),
            run, report, self.args.timeouts.preprocess_s)
        metrics.stage_duration().observe(time.perf_counter() - started, tags={"stage": "preprocess"})
        metrics.bytes_total().inc(prepared.input_bytes, tags={"direction": "downloaded"})
        plan = prepared.plan
        run.total_steps = prepared.conditioning.num_steps
        for note in prepared.notes:
            await report(message=note)
        await report(message=f"prepared in {time.perf_counter() - started:.1f} s: {prepared.width}x{prepared.height}"
                             f", {plan.output_frames} frames, {plan.num_windows} windows x {run.total_steps} steps")

        # The initial state sits in a list that ``denoise`` takes it from: no local name keeps it alive through
        # the loop (a latent-sized buffer: 1.4 GiB fp32 at 600 s and 480x832).
        initial: list[torch.Tensor] = []
        start_step = 0
        if checkpoints and job.checkpoint_key:
            resumed = await asyncio.to_thread(self._load_checkpoint, job.checkpoint_key, prepared, job.seed,
                                              job.model_fingerprint)
            if resumed is None:
                await report(message="the checkpoint does not match this job's inputs; starting over", level="WARN")
            else:
                start_step, state = resumed
                initial.append(state)
                del resumed, state
                run.step = start_step
                await report(message=f"resumed from the checkpoint after step {start_step}/{run.total_steps}")
        if not initial:
            initial.append(await asyncio.to_thread(initial_noise, job.seed, prepared.latent_shape, self.state_dtype))

        await self._admit(run, prepared, run.total_steps - start_step, report)
        await report(stage="denoising")
        units = await self._unit_plan(job.request_id, prepared, start_step)
        await report(message=units.describe())
        conditioning_ref = await asyncio.to_thread(ray.put, prepared.conditioning)
        prepared = prepared.without_conditioning()  # the object store holds it now: no second copy here
        executor = RayDenoiserExecutor(self.denoiser, conditioning_ref, job.request_id,
                                       self.args.window_step_retries, on_retry=report.retry,
                                       max_in_flight=self.args.denoiser.capacity, num_steps=run.total_steps,
                                       unit_timeout_s=self.args.timeouts.unit_s, on_unit_done=run.progressed)
        step_started = [time.perf_counter()]
        every = self.args.checkpoint_every_steps if checkpoints else 0
        last_saved = [start_step - 1]

        async def on_step(step: int, fused: torch.Tensor) -> None:
            run.step = step + 1
            replicas = len(executor.last_replicas)
            await report(message=f"denoising step {step + 1}/{run.total_steps}, {plan.num_windows} windows on "
                                 f"{replicas} replica{'s' if replicas != 1 else ''} "
                                 f"({time.perf_counter() - step_started[0]:.2f} s)")
            step_started[0] = time.perf_counter()
            if units.checkpoint_due(step, run.total_steps, every, last_saved[0]):
                await self._checkpoint(run, prepared, step, fused)
                last_saved[0] = step

        denoise_started = time.perf_counter()
        try:
            latents = await denoise(plan, initial.pop(), run.total_steps, executor, self.args.pipeline.weight_scheme,
                                    start_step=start_step, on_step=on_step, **units.denoise_kwargs())
        except BaseException:
            self._release_later(executor)  # cancelled or failed: the replicas still drop the request's caches
            raise
        await executor.release(self.args.denoiser.max_replicas)
        executor.close()
        del conditioning_ref  # the conditioning leaves the object store now, not after postprocessing
        handed_over = await asyncio.to_thread(put_tensor, latents)  # stored once, read in place by the Postprocessor
        del latents
        metrics.stage_duration().observe(time.perf_counter() - denoise_started, tags={"stage": "denoise"})

        post_started = time.perf_counter()
        stored = await self._postprocess(run, prepared, handed_over, report)
        metrics.stage_duration().observe(time.perf_counter() - post_started, tags={"stage": "postprocess"})
        metrics.bytes_total().inc(stored.file_size, tags={"direction": "uploaded"})
        metrics.output_seconds().inc(stored.frames / FPS)
        await report(message=f"encoded {stored.frames} frames in {stored.encode_s:.1f} s, uploaded "
                             f"{stored.file_size / 1e6:.2f} MB")
        return StoredResult(video=StoredVideo(key=stored.key, file_size=stored.file_size), seed=job.seed)

    async def _admit(self, run: Run, prepared: PreparedRequest, steps: int, report: RunReporter) -> None:
        """Wait for a slot (:mod:`deployments.orchestrator.admission`), held until this run's task ends, however
        it ends. Waiting is not stalling: the stall clock waits too (``timeouts.job_s`` still bounds the job)."""
        work = prepared.plan.num_windows * 3 * steps  # guidance rows, as the Denoisers' queue counts them
        if not self.admission.fits(work):
            await report(message=f"waiting for a slot on {self.runner_id}: {self.admission.running} jobs run there "
                                 f"and jobs with less work go first ({work} guidance rows here)")
        with run.bounded(self.args.timeouts.job_s):
            ticket = await self.admission.admit(work)
        asyncio.current_task().add_done_callback(lambda _task: ticket.release())

    async def _postprocess(self, run: Run, prepared: PreparedRequest, handed_over: list[ray.ObjectRef],
                           report: RunReporter) -> PostprocessResult:
        """Decode, encode and upload the video as one object (:meth:`SegmentedFinish.finish`: serially, or in
        segments on several Postprocessor replicas). ``handed_over`` is emptied: the latents leave the object
        store."""
        key = result_key(run.request_id, run.epoch)

        def uploading():
            run.uncommitted.add(key)  # deleted unless the completion that names it wins
            return run.writing_objects(final=True)

        timeout_s = self.args.timeouts.postprocess_s

        async def call_stage(deployment: str, call: Callable[[], Any], report: RunReporter) -> Any:
            return await self._call_stage(deployment, call, run, report, timeout_s)

        with run.bounded(timeout_s):  # the segments' calls too: the stall clock waits for them
            return await self.segmented.finish(run.request_id, prepared, handed_over, key, report, call_stage,
                                               uploading)

    async def _call_stage(self, deployment: str, call: Callable[[], Any], run: Run, report: RunReporter,
                          timeout_s: float) -> Any:
        """One Preprocessor/Postprocessor call, sent again when its replica died under it (a killed replica, a lost
        node): both calls are pure functions of their arguments (the Postprocessor overwrites the same result key),
        so a retry cannot change the result, and the job is not failed for a replica's death. A call that takes
        longer than ``timeout_s`` is cancelled and ends the attempt (``StageTimeoutError``: the job is retried);
        while it runs, the run's stall clock waits."""
        retries = self.args.window_step_retries
        for attempt in range(retries + 1):
            response = call()
            try:
                with run.bounded(timeout_s):
                    async with asyncio.timeout(timeout_s):
                        return await response
            except TimeoutError:
                response.cancel()
                raise StageTimeoutError(f"the {deployment} call took longer than {timeout_s:g} s") from None
            except RETRYABLE as exc:
                if attempt == retries:
                    raise
                await report(message=f"the {deployment} replica failed ({type(exc).__name__}); running the call "
                                     f"again on another replica (retry {attempt + 1})", level="WARN")
        raise AssertionError("unreachable")

    # -- units: what the Denoisers run for this request (settings from args.pipeline, as the CLI) -------------
    async def _unit_plan(self, request_id: str, prepared: PreparedRequest, start_step: int) -> UnitPlan:
        cond, level = prepared.conditioning, prepared.acceleration
        step_cache = None
        if level != "none":  # the plan needs the DiT's timestep modulation: any Denoiser replica computes it
            response = self.denoiser.step_cache_plan.remote(request_id, request_offset(request_id), cond.num_steps,
                                                            level)
            try:
                async with asyncio.timeout(self.args.timeouts.unit_s):
                    step_cache = await response
            except TimeoutError:
                response.cancel()
                raise UnitTimeoutError(f"the step-cache plan took longer than {self.args.timeouts.unit_s:g} s") \
                    from None
        return unit_plan(self.args.pipeline, cond, level, step_cache, start_step)

    def _release_later(self, executor: RayDenoiserExecutor) -> None:
        task = asyncio.get_running_loop().create_task(executor.release(self.args.denoiser.max_replicas))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- checkpoints -------------------------------------------------------------------------------------------
    async def _checkpoint(self, run: Run, prepared: PreparedRequest, step: int, latents: torch.Tensor) -> None:
        """The fused latents after ``step`` (0-based) as the job's checkpoint, under a key of its own (the runner
        writes the object, names it on the row, and prunes the one it replaced)."""
        def save(key: str) -> None:
            save_checkpoint(self.storage, key, latents, step=step, seed=run.job.seed,
                            shape=list(prepared.latent_shape), num_steps=run.total_steps,
                            model_fingerprint=run.job.model_fingerprint)

        await self.runner.checkpoint(run, step + 1, save)

    def _load_checkpoint(self, key: str, prepared: PreparedRequest, seed: int,
                         model_fingerprint: str) -> tuple[int, torch.Tensor] | None:
        """(first step to run, latents), or None when the object is gone, belongs to other inputs, or was written
        by another model (its fingerprint differs)."""
        try:
            state = load_checkpoint(self.storage, key)
        except KeyError:
            return None
        if (state["seed"], state["shape"], state["num_steps"], state.get("model_fingerprint", "")) != (
                seed, list(prepared.latent_shape), prepared.conditioning.num_steps, model_fingerprint):
            return None
        return state["step"] + 1, state["latents"].to(self.state_dtype)
