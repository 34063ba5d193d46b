"""JobQueue: owns queue order, job state and logs; one replica; every change is written to storage first.

It dispatches queued jobs to the Orchestrator (at most ``max_running_jobs`` at once), re-queues a job whose
Orchestrator replica died (the Orchestrator resumes it from its latest latent checkpoint), enforces the
time-to-start deadline, cancels, and delivers webhooks. On start it reloads every unfinished job from storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError, RequestCancelledError

from deployments import metrics
from deployments.auth import TokenBucket
from deployments.config import AppArgs
from deployments.errors import error_response, root_cause
from deployments.jobs import JobError, JobRecord, JobStore, Priority, queue_order
from deployments.storage import make_storage
from deployments.webhooks import deliver_webhook, webhook_payload
from pipeline.fetch import AddressGuard
from pipeline.generator import resolve_seed
from pipeline.schema import StableAvatarInput

logger = logging.getLogger("ray.serve")


class QueueFullError(Exception):
    """More jobs are queued than the submitter allowed (``fal_max_queue_length``) or the server allows."""


class RateLimitedError(Exception):
    """The key submitted faster than its rate; ``retry_after_s`` says when the next submit is allowed."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message, retry_after_s)
        self.message, self.retry_after_s = message, retry_after_s

    def __str__(self) -> str:
        return self.message


@serve.deployment(name="JobQueue", num_replicas=1, max_ongoing_requests=1000)
class JobQueue:
    def __init__(self, orchestrator, args: AppArgs):
        self.orchestrator, self.args = orchestrator, args
        self.store = JobStore(make_storage(args.storage))
        self.jobs: dict[str, JobRecord] = {}
        self.responses: dict[str, Any] = {}
        self.tasks: set[asyncio.Task] = set()
        self.running: set[str] = set()
        self.sequence = 0
        self._wake: asyncio.Event | None = None
        self.rate_limit = TokenBucket(args.auth.submit_rate_per_minute / 60.0, args.auth.submit_burst)
        self._dispatcher: asyncio.Task | None = None
        for job in self.store.load_all():
            self.jobs[job.request_id] = job
            self.sequence = max(self.sequence, job.sequence)
            if job.status == "IN_PROGRESS":
                job.status, job.stage = "IN_QUEUE", "queued"
                job.log("the service restarted; the job is queued again and resumes from its last checkpoint")
                self.store.save(job)
        unfinished = sum(not j.finished for j in self.jobs.values())
        logger.info("job queue loaded %d jobs (%d unfinished)", len(self.jobs), unfinished)

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def _ensure_dispatcher(self) -> None:
        if self._dispatcher is None or self._dispatcher.done():
            self._wake = asyncio.Event()
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch_loop())
            for job in self.jobs.values():  # webhooks owed from before a restart
                if job.finished and job.webhook_url and not job.webhook_done:
                    self._spawn(self._deliver(job))

    async def check_health(self) -> None:
        self._ensure_dispatcher()  # also starts dispatching after a restart, before any request arrives

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _wakeup(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # -- API used by the Gateway -------------------------------------------------------------------------------
    async def submit(self, request: StableAvatarInput, app_id: str, owner: str = "", priority: Priority = "normal",
                     webhook_url: str | None = None, start_timeout_s: float | None = None,
                     max_queue_length: int | None = None) -> dict[str, Any]:
        self._ensure_dispatcher()
        queued = [j for j in self.jobs.values() if j.status == "IN_QUEUE"]
        limit = min(x for x in (max_queue_length, self.args.max_queue_length) if x is not None)
        if len(queued) >= limit:
            raise QueueFullError(f"the queue holds {len(queued)} jobs (limit {limit})")
        mine = sum(j.owner == owner for j in queued)
        if mine >= self.args.auth.max_queued_per_key:
            raise QueueFullError(f"this API key already has {mine} queued jobs (limit "
                                 f"{self.args.auth.max_queued_per_key})")
        wait = self.rate_limit.take(owner)
        if wait > 0:
            raise RateLimitedError(f"too many submits for this API key; retry in {wait:.1f} s", wait)
        self.sequence += 1
        seed = resolve_seed(request.seed)
        job = JobRecord(
            request_id=uuid.uuid4().hex, app_id=app_id, input=request.model_dump(), seed=seed, owner=owner,
            priority=priority, sequence=self.sequence, webhook_url=webhook_url,
            start_deadline=time.time() + start_timeout_s if start_timeout_s else None,
        )
        job.log(f"queued ({priority} priority)")
        self.store.save(job)  # durable before it is acknowledged
        self.jobs[job.request_id] = job
        metrics.jobs_total().inc(tags={"outcome": "submitted"})
        self._update_gauges()
        self._wakeup()
        return {"request_id": job.request_id, "queue_position": self.position(job)}

    def _owned(self, request_id: str, owner: str) -> JobRecord | None:
        """Another key's job does not exist for this caller (404, not 403: ids are not confirmed)."""
        job = self.jobs.get(request_id)
        return job if job is not None and job.owner == owner else None

    async def get(self, request_id: str, owner: str = "") -> JobRecord | None:
        self._ensure_dispatcher()
        job = self._owned(request_id, owner)
        if job is None:
            return None
        return job.model_copy(update={"input": {}}, deep=False)

    async def get_with_position(self, request_id: str, owner: str = "") -> tuple[JobRecord, int] | None:
        job = await self.get(request_id, owner)
        return None if job is None else (job, self.position(self.jobs[request_id]))

    async def cancel(self, request_id: str, owner: str = "") -> str:
        job = self._owned(request_id, owner)
        if job is None:
            return "NOT_FOUND"
        if job.finished:
            return "ALREADY_COMPLETED"
        job.cancel_requested = True
        job.log("cancellation requested")
        if job.status == "IN_QUEUE":
            self._complete(job, error=self._cancelled_error())
        else:
            self.store.save(job)
            response = self.responses.get(request_id)
            if response is not None:
                response.cancel()
        return "CANCELLATION_REQUESTED"

    async def report(self, request_id: str, stage: str | None = None, progress: float | None = None,
                     message: str | None = None, level: str = "INFO") -> bool:
        """Progress from the Orchestrator; returns True when the job was cancelled."""
        job = self.jobs.get(request_id)
        if job is None or job.finished:
            return True
        if stage is not None:
            job.stage = stage
        if progress is not None:
            job.progress = max(0.0, min(1.0, progress))
        if message:
            job.log(message, level)
        self.store.save(job)
        return job.cancel_requested

    def _update_gauges(self) -> None:
        metrics.queue_length().set(self.queue_length())
        metrics.running_jobs().set(len(self.running))

    def queue_length(self) -> int:
        return sum(j.status == "IN_QUEUE" for j in self.jobs.values())

    def position(self, job: JobRecord) -> int:
        """Jobs ahead of this one (0-based), in dispatch order."""
        if job.status != "IN_QUEUE":
            return 0
        key = queue_order(job)
        return sum(1 for j in self.jobs.values() if j.status == "IN_QUEUE" and queue_order(j) < key)

    # -- dispatching -------------------------------------------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        assert self._wake is not None
        while True:
            try:
                self._expire_start_deadlines()
                while len(self.running) < self.args.max_running_jobs:
                    queued = [j for j in self.jobs.values() if j.status == "IN_QUEUE"]
                    if not queued:
                        break
                    self._start(min(queued, key=queue_order))
            except Exception:  # noqa: BLE001 - the loop must survive anything
                logger.exception("job dispatcher error")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=0.5)

    def _expire_start_deadlines(self) -> None:
        now = time.time()
        for job in list(self.jobs.values()):
            if job.status == "IN_QUEUE" and job.start_deadline is not None and now > job.start_deadline:
                job.log("not started before its X-Fal-Request-Timeout deadline", "ERROR")
                self._complete(job, error=JobError(
                    status_code=504, detail="Request timed out before it started", error_type="request_timeout",
                    message="Request timed out before it started", timeout_type="user"))

    def _start(self, job: JobRecord) -> None:
        job.status, job.stage, job.attempts = "IN_PROGRESS", "starting", job.attempts + 1
        job.started_at = job.started_at or time.time()
        job.log(f"started (attempt {job.attempts})" if job.attempts > 1 else "started")
        self.store.save(job)
        self.running.add(job.request_id)
        if job.attempts == 1:
            metrics.time_in_queue().observe(job.started_at - job.created_at)
        self._update_gauges()
        self._spawn(self._run(job))

    async def _run(self, job: JobRecord) -> None:
        request_id = job.request_id
        try:
            response = self.orchestrator.run_job.remote(request_id, StableAvatarInput(**job.input), job.seed,
                                                        job.owner)
            self.responses[request_id] = response
            result = await response
            self._complete(job, result=result)
        except (asyncio.CancelledError, RequestCancelledError):
            if job.cancel_requested:
                self._complete(job, error=self._cancelled_error())
            else:
                self._requeue_or_fail(job, "the job's run was interrupted")
        except Exception as exc:  # noqa: BLE001 - every failure ends the job with a fal error
            cause = root_cause(exc)
            if job.cancel_requested:
                self._complete(job, error=self._cancelled_error())
            elif isinstance(cause, RayActorError | ReplicaUnavailableError):
                self._requeue_or_fail(job, f"the Orchestrator replica was lost ({type(cause).__name__})")
            else:
                status, body = error_response(exc)
                if status >= 500:
                    logger.exception("job %s failed", request_id)
                message = body["detail"] if isinstance(body["detail"], str) else body["detail"][0]["msg"]
                self._complete(job, error=JobError(
                    status_code=status, detail=body["detail"], message=message,
                    error_type="internal_error" if status >= 500 else "validation_error"))
        finally:
            self.responses.pop(request_id, None)
            self.running.discard(request_id)
            self._update_gauges()
            self._wakeup()

    def _requeue_or_fail(self, job: JobRecord, reason: str) -> None:
        if job.attempts < self.args.job_attempts:
            job.status, job.stage = "IN_QUEUE", "queued"
            job.log(f"{reason}; queued again, it resumes from its last checkpoint", "WARN")
            self.store.save(job)
        else:
            self._complete(job, error=JobError(
                status_code=503, detail=f"{reason} ({job.attempts} attempts)", error_type="runner_disconnected",
                message=reason))

    @staticmethod
    def _cancelled_error() -> JobError:
        return JobError(status_code=499, detail="Request cancelled", error_type="client_cancelled",
                        message="Request cancelled")

    def _complete(self, job: JobRecord, result: dict | None = None, error: JobError | None = None) -> None:
        job.status, job.completed_at = "COMPLETED", time.time()
        job.result, job.error = result, error
        outcome = "completed" if error is None else (
            "cancelled" if error.error_type == "client_cancelled" else "failed")
        metrics.jobs_total().inc(tags={"outcome": outcome})
        if error is None:
            metrics.job_latency().observe(job.completed_at - job.created_at)
        self._update_gauges()
        if error is None:
            job.stage, job.progress = "completed", 1.0
            job.log(f"completed in {job.inference_time or 0:.1f} s")
        else:
            job.stage = "cancelled" if error.error_type == "client_cancelled" else "failed"
            job.log(f"failed: {error.message}" if job.stage == "failed" else "cancelled", "ERROR")
        self.store.save(job)
        if job.webhook_url:
            self._spawn(self._deliver(job))

    async def _deliver(self, job: JobRecord) -> None:
        from deployments.results import public_result

        if job.error is None:
            body = webhook_payload(job.request_id, True, public_result(job.result, self.store.storage), None)
        else:
            body = webhook_payload(job.request_id, False, {"detail": job.error.detail}, job.error.message)

        def report(level: str, message: str) -> None:
            job.log(message, level)
            self.store.save(job)

        job.webhook_delivered = await deliver_webhook(
            job.webhook_url or "", body, report, AddressGuard(self.args.inputs.allow_private_hosts),
            self.args.webhook_attempts, self.args.webhook_first_delay_s)
        job.webhook_done = True
        self.store.save(job)
