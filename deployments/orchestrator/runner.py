"""The dispatcher inside every Orchestrator replica: claim jobs, hold their leases, settle how each run ended.

A replica claims queued jobs from the jobs database itself (pull: up to ``max_running_jobs`` at once, polling
every ``dispatch.poll_interval_s`` while idle) and sync requests create their row already claimed by it, so the
process that holds a job's lease is the one doing its work. A heartbeat renews the lease every
``dispatch.heartbeat_s``; when the replica dies the lease runs out and any replica of any application on the same
database claims the job again (epoch + 1) and resumes it from its latent checkpoint.

Every write is fenced by ``(request_id, epoch)``: a runner that lost its lease gets ``FencedError`` on its next
write (or heartbeat), stops, and deletes the objects it wrote under its epoch that the row does not name. A
cancel request is seen at the next heartbeat or step report and stops the work at once (window-steps in flight
finish on their replicas and are dropped). A replica that shuts down gracefully hands its queued jobs back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from deployments.config import AppArgs
from deployments.contracts import JobCancelled, StoredResult
from deployments.jobstore import ClaimedJob, FencedError, JobError, JobStore, cancelled_error
from deployments.runtime import metrics
from deployments.runtime.background import BackgroundLoop
from deployments.runtime.errors import error_response
from deployments.storage import Storage

if TYPE_CHECKING:
    from pipeline.denoise import WindowStep

logger = logging.getLogger("ray.serve")


@dataclass
class Run:
    """One job this replica holds a lease on, and what its run wrote."""

    job: ClaimedJob
    work: asyncio.Task | None = None  # the job's execution (cancelled on cancel requests and lost leases)
    cancel_requested: bool = False
    fenced: bool = False
    writing: bool = False  # an object is being written: stop after it, never during it (no orphan objects)
    handing_back: bool = False  # the replica is shutting down: give a queued job back, it resumes elsewhere
    uncommitted: set[str] = field(default_factory=set)  # objects under our epoch that no row names yet
    checkpoints: set[str] = field(default_factory=set)  # checkpoint objects of the job (deleted once it is done)
    step: int = 0
    total_steps: int = 0

    @property
    def request_id(self) -> str:
        return self.job.request_id

    @property
    def epoch(self) -> int:
        return self.job.epoch

    @contextlib.asynccontextmanager
    async def writing_objects(self, final: bool = False):
        """A stretch (a checkpoint, the video) that a cancel request, a lost lease or a shutdown does not
        interrupt: a write cut short would go on in its thread after we deleted its object. The stop happens
        right after it (after the ``final`` write a shutdown lets the run commit instead)."""
        self.writing = True
        try:
            yield
        finally:
            self.writing = False
        if self.fenced:
            raise FencedError(self.request_id, self.epoch, "write")
        if self.cancel_requested:
            raise JobCancelled(self.request_id)
        if self.handing_back and not final:
            raise asyncio.CancelledError()

    def stop_now(self) -> bool:
        """Stop the work at once unless it is writing an object (then it stops when the write is done)."""
        if self.writing or self.work is None:
            return False
        self.work.cancel()
        return True


class RunReporter:
    """A run's progress and log lines, written to its row (fenced by epoch; each write also renews the lease).
    Raises ``JobCancelled`` once the job's cancellation was requested, ``FencedError`` once the lease is lost."""

    def __init__(self, store: JobStore, run: Run, lease_s: float):
        self.store, self.run, self.lease_s = store, run, lease_s

    async def __call__(self, stage: str | None = None, message: str | None = None, level: str = "INFO") -> None:
        run = self.run
        if message:
            logger.info("%s (epoch %d): %s", run.request_id, run.epoch, message)
        fraction = run.step / run.total_steps if run.total_steps else 0.0
        try:
            cancel = await self.store.report(run.request_id, run.epoch, stage=stage, progress=fraction,
                                             message=message, level=level, lease_s=self.lease_s)
        except FencedError:
            run.fenced = True
            raise
        if cancel:
            run.cancel_requested = True
            raise JobCancelled(run.request_id)

    async def retry(self, work: WindowStep, attempt: int, error: BaseException) -> None:
        """The executor's ``on_retry``: a window-step whose Denoiser replica failed runs again elsewhere."""
        await self(message=f"window {work.window} step {work.step + 1} rows {list(work.rows)}: the Denoiser replica "
                           f"failed ({type(error).__name__}); running it again on another replica (retry {attempt})",
                   level="WARN")


Execute = Callable[[Run, RunReporter], Awaitable[StoredResult]]


def job_error(exc: BaseException) -> JobError:
    """How a run's exception answers the job's result request (the same mapping as the sync route's)."""
    status, body = error_response(exc)
    detail = body["detail"]
    message = detail if isinstance(detail, str) else detail[0]["msg"]
    return JobError(status_code=status, detail=detail, message=message,
                    error_type="internal_error" if status >= 500 else "validation_error")


class JobRunner:
    """Claims and runs jobs for one replica (``runner_id``); ``execute(run, report)`` does one job's work and
    returns its stored result after writing the objects it names."""

    def __init__(self, store: JobStore, storage: Storage, args: AppArgs, runner_id: str, execute: Execute,
                 may_claim: Callable[[int], bool] | None = None):
        self.store, self.storage, self.args, self.runner_id = store, storage, args, runner_id
        self.execute = execute
        # whether to claim another job while holding that many (default: fewer than max_running_jobs)
        self.may_claim = may_claim or (lambda held: held < args.max_running_jobs)
        self.dispatch = args.dispatch
        self.runs: dict[str, Run] = {}
        self.queued_runs: set[asyncio.Task] = set()
        self.loop = BackgroundLoop(f"job-claims-{runner_id}", self._claim_loop)

    # -- the claim loop ------------------------------------------------------------------------------------------
    async def _claim_loop(self) -> None:
        idle_ticks = 0
        while True:
            claimed = None
            try:
                if self.may_claim(len(self.queued_runs)):
                    claimed = await self.store.claim(self.runner_id, self.dispatch.lease_s)
                    if claimed is not None:
                        self._start(claimed)
                else:  # full: claims would not run, but start deadlines and dead runners' leases still expire
                    await self.store.maintain()
                if idle_ticks % 10 == 0:
                    metrics.queue_length().set(await self.store.queue_length())
            except Exception:  # noqa: BLE001 - the database may be away for a while; keep trying
                logger.exception("runner %s: claim failed; trying again", self.runner_id)
            idle_ticks += 1
            if claimed is None:
                await asyncio.sleep(self.dispatch.poll_interval_s)

    def _start(self, job: ClaimedJob) -> None:
        logger.info("runner %s claimed %s (epoch %d, attempt %d)", self.runner_id, job.request_id, job.epoch,
                    job.attempts)
        if job.attempts == 1:
            metrics.time_in_queue().observe(max(0.0, job.started_at - job.created_at))
        task = asyncio.get_running_loop().create_task(self._run_queued(Run(job)))
        self.queued_runs.add(task)
        task.add_done_callback(self.queued_runs.discard)

    async def _run_queued(self, run: Run) -> None:
        with contextlib.suppress(Exception, asyncio.CancelledError):  # settled and logged in supervise
            await self.supervise(run)

    # -- one run -------------------------------------------------------------------------------------------------
    async def supervise(self, run: Run) -> StoredResult:
        """Run ``run`` to its end and settle it in the database; returns the stored result or re-raises why it
        did not finish (the sync route answers with it)."""
        self.runs[run.request_id] = run
        metrics.running_jobs().set(len(self.runs))
        report = RunReporter(self.store, run, self.dispatch.lease_s)
        run.work = asyncio.ensure_future(self.execute(run, report))
        keeper = asyncio.ensure_future(self._keep_lease(run))
        try:
            try:
                stored = await asyncio.shield(run.work)
            except asyncio.CancelledError:
                caller_left = not run.work.done()  # we were cancelled (sync caller gone, replica stopping)
                if caller_left:
                    run.cancel_requested = not run.handing_back
                    run.stop_now()
                    await asyncio.wait([run.work])
                    if not run.work.cancelled() and run.work.exception() is None:  # it finished its last write
                        await self._commit(run, run.work.result())
                        raise
                await self._settle_interrupted(run)
                if caller_left or asyncio.current_task().cancelling():
                    raise
                if run.fenced:  # the heartbeat found the lease lost and stopped the work
                    raise FencedError(run.request_id, run.epoch, "heartbeat") from None
                raise JobCancelled(run.request_id) from None
            except JobCancelled:
                await self._settle_interrupted(run)
                raise
            except FencedError:
                run.fenced = True
                logger.warning("runner %s lost the lease of %s (epoch %d); stopping", self.runner_id,
                               run.request_id, run.epoch)
                raise
            except Exception as exc:
                await self._fail(run, exc)
                raise
            return await self._commit(run, stored)
        finally:
            keeper.cancel()
            self.runs.pop(run.request_id, None)
            metrics.running_jobs().set(len(self.runs))
            await self._delete(run.uncommitted)

    async def _keep_lease(self, run: Run) -> None:
        """Renew the lease until cancelled; on a cancel request or a lost lease stop the work (after the object
        it may be writing; the lease is renewed meanwhile)."""
        while True:
            await asyncio.sleep(self.dispatch.heartbeat_s)
            if not run.fenced:
                try:
                    run.cancel_requested |= await self.store.heartbeat(run.request_id, run.epoch,
                                                                       self.dispatch.lease_s)
                except FencedError:
                    run.fenced = True
                except Exception:  # noqa: BLE001 - a database hiccup: the lease has room for a few misses
                    logger.warning("runner %s: heartbeat of %s failed; retrying", self.runner_id, run.request_id,
                                   exc_info=True)
                    continue
            if (run.fenced or run.cancel_requested) and run.stop_now():
                return

    async def _commit(self, run: Run, stored: StoredResult) -> StoredResult:
        key = stored.video.key
        try:
            job = await self.store.complete(run.request_id, run.epoch, result=stored.model_dump(),
                                            result_keys=[key])
        except FencedError:  # another runner finished it, or it was cancelled meanwhile: ours is surplus
            run.fenced = True
            raise
        run.uncommitted.discard(key)
        await self._delete(run.checkpoints)  # the job is done: nothing will resume from them
        metrics.jobs_total().inc(tags={"outcome": "completed"})
        if job.completed_at is not None:
            metrics.job_latency().observe(job.completed_at - job.created_at)
        return stored

    async def _fail(self, run: Run, exc: BaseException) -> None:
        error = job_error(exc)
        if error.status_code >= 500:
            logger.error("job %s failed on %s", run.request_id, self.runner_id, exc_info=exc)
        await self._finish(run, error, "failed")

    async def _settle_interrupted(self, run: Run) -> None:
        """The work stopped before its end: a cancelled job ends cancelled; a queued job of a replica that shuts
        down goes back to the queue (it resumes elsewhere); a sync job whose caller left is cancelled."""
        if run.fenced:
            return
        if run.handing_back and not run.cancel_requested:
            try:
                await self.store.release(run.request_id, run.epoch,
                                         f"the runner {self.runner_id} is shutting down")
            except FencedError:
                run.fenced = True
            return
        await self._finish(run, cancelled_error(), "cancelled")

    async def _finish(self, run: Run, error: JobError, outcome: str) -> None:
        try:
            await self.store.complete(run.request_id, run.epoch, error=error)
        except FencedError:
            run.fenced = True
            return
        await self._delete(run.checkpoints)
        metrics.jobs_total().inc(tags={"outcome": outcome})

    async def _delete(self, keys: set[str]) -> None:
        for key in list(keys):
            try:
                await asyncio.to_thread(self.storage.delete, key)
                keys.discard(key)
            except Exception:  # noqa: BLE001 - retention removes what is left
                logger.warning("could not delete %s", key, exc_info=True)

    # -- shutdown ------------------------------------------------------------------------------------------------
    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop claiming and hand the queued jobs back (each resumes from its checkpoint on another replica)."""
        await self.loop.stop()
        tasks = list(self.queued_runs)
        for run in self.runs.values():
            if run.job.kind == "queue":
                run.handing_back = True
        for task in tasks:
            task.cancel()
        if tasks:
            started = time.monotonic()
            await asyncio.wait(tasks, timeout=timeout_s)
            logger.info("runner %s handed back %d jobs in %.1f s", self.runner_id, len(tasks),
                        time.monotonic() - started)
