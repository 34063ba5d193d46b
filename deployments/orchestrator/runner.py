"""The dispatcher inside every Orchestrator replica: claim jobs, hold their leases, settle how each run ended.

A replica claims queued jobs of its own model fingerprint from the jobs database itself (pull: up to
``max_running_jobs`` at once; while idle it waits for a submit's NOTIFY on PostgreSQL, or polls every
``dispatch.poll_interval_s``) and sync requests create their row already claimed by it, so the process that holds
a job's lease is the one doing its work. A heartbeat renews the lease every ``dispatch.heartbeat_s`` while the run
makes progress; when the replica dies, hangs or stalls, the lease runs out and any replica of the same model on the
same database claims the job again (epoch + 1) and resumes it from its latent checkpoint.

How a run ends (:mod:`deployments.orchestrator.faults`): its result, committed once; an input or pipeline error,
failed at once; an infrastructure fault (the database, the storage, a replica's death, a timeout, a stall), let go
with ``retry`` so the job runs again from its checkpoint after a backoff, up to ``job_attempts`` (then it is a dead
letter an operator can re-queue); a cancel request; the job deadline (``timeouts.job_s``, 504); a lost lease.

Every write is fenced by ``(request_id, epoch)``: a runner that lost its lease gets ``FencedError`` on its next
write (or heartbeat) and stops. Objects: every write gets a key of its own (checkpoints ``.../e<epoch>/s<step>/``,
results ``.../e<epoch>/``); a key a row names is deleted by the retention sweeper alone, so a runner deletes only
what it wrote that no row names: a checkpoint once the row names a newer one, its own objects when its naming write
was refused, and, after an ambiguous COMMIT (a driver error on the write), only what the database confirms no row
names. A naming write (a completion, a checkpoint's record) is awaited to its end even when the run is cancelled
meanwhile (the replica stops, a sync caller leaves): it goes on in its thread regardless, and only its outcome
says whether its object is named.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from deployments.config import AppArgs
from deployments.contracts import JobCancelled, StoredResult
from deployments.jobstore import ClaimedJob, FencedError, JobError, JobStore, LogEntry, cancelled_error
from deployments.orchestrator.faults import (
    RunStalledError,
    StoreUnreachableError,
    fault_class,
    infrastructure_error,
    is_database_fault,
    job_deadline_error,
)
from deployments.runtime import metrics
from deployments.runtime.background import BackgroundLoop
from deployments.runtime.errors import error_response
from deployments.storage import Storage
from deployments.storage.keys import checkpoint_key
from pipeline.to_the_end import to_the_end

if TYPE_CHECKING:
    from pipeline.denoise import WindowStep

logger = logging.getLogger("ray.serve")
R = TypeVar("R")
MAX_LINES_PER_WRITE = 500  # log lines per transaction (the store takes at most 1000)
SETTLE_PAUSE_S = 0.5  # first pause between tries of a write that ends a run, doubling


@dataclass
class Run:
    """One job this replica holds a lease on, and what its run wrote."""

    job: ClaimedJob
    work: asyncio.Task | None = None  # the job's execution (cancelled on cancel requests and lost leases)
    cancel_requested: bool = False
    fenced: bool = False
    stalled: bool = False  # no progress for timeouts.stall_s: the lease is no longer renewed
    timed_out: bool = False  # past the job deadline (timeouts.job_s)
    writing: bool = False  # an object is being written: stop after it, never during it (no orphan objects)
    handing_back: bool = False  # the replica is shutting down: give a queued job back, it resumes elsewhere
    uncommitted: set[str] = field(default_factory=set)  # objects under our epoch that no row names: deleted at the end
    unsure: set[str] = field(default_factory=set)  # objects whose naming write was ambiguous: deleted if unnamed
    step: int = 0
    total_steps: int = 0
    deadline: float = float("inf")  # time.monotonic() of the job deadline
    last_progress: float = field(default_factory=time.monotonic)
    quiet_until: float = 0.0  # a call bounded by its own timeout is in flight until then: not a stall

    @property
    def request_id(self) -> str:
        return self.job.request_id

    @property
    def epoch(self) -> int:
        return self.job.epoch

    @property
    def stopping(self) -> bool:
        """The run must end as soon as it can (the job is not finished by it)."""
        return self.fenced or self.cancel_requested or self.stalled or self.timed_out

    def progressed(self) -> None:
        """Work moved on (a unit finished, a step, a log line): the stall clock starts again."""
        self.last_progress = time.monotonic()

    def stalled_for(self, now: float) -> float:
        """Seconds without progress, not counting a bounded call in flight."""
        return 0.0 if now < self.quiet_until else now - max(self.last_progress, self.quiet_until)

    @contextlib.contextmanager
    def bounded(self, timeout_s: float):
        """A call that has its own timeout (a Preprocessor or Postprocessor call): the stall clock waits for it."""
        self.quiet_until = time.monotonic() + timeout_s
        try:
            yield
        finally:
            self.quiet_until = 0.0
            self.progressed()

    def raise_if_stopped(self) -> None:
        if self.fenced:
            raise FencedError(self.request_id, self.epoch, "write")
        if self.cancel_requested:
            raise JobCancelled(self.request_id)

    @contextlib.asynccontextmanager
    async def writing_objects(self, final: bool = False):
        """A stretch (a checkpoint, the video) that a cancel request, a lost lease, a stall or a shutdown does not
        interrupt: a write cut short would go on in its thread after we deleted its object. The stop happens right
        after it (after the ``final`` write, a shutdown, a stall or the deadline lets the run commit instead)."""
        self.writing = True
        try:
            yield
        finally:
            self.writing = False
        self.raise_if_stopped()
        if (self.handing_back or self.stalled or self.timed_out) and not final:
            raise asyncio.CancelledError()

    def stop_now(self) -> bool:
        """Stop the work at once unless it is writing an object (then it stops when the write is done)."""
        if self.writing or self.work is None:
            return False
        self.work.cancel()
        return True


class RunReporter:
    """A run's progress and log lines, written to its row in batches: one transaction (on a durable database, one
    disk flush) per ``flush_s`` at most, each renewing the lease, instead of one per line.

    Raises ``JobCancelled`` once the job's cancellation was seen, ``FencedError`` once the lease is lost. A write
    that fails on a database error keeps its lines for the next one (a progress report is never worth a job);
    only when the writes keep failing for longer than the lease, ``StoreUnreachableError`` ends the attempt."""

    def __init__(self, store: JobStore, run: Run, lease_s: float, flush_s: float):
        self.store, self.run, self.lease_s, self.flush_s = store, run, lease_s, flush_s
        self.lines: list[LogEntry] = []
        self.stage: str | None = None
        self.failing_since: float | None = None
        self._last_write = 0.0
        self._flusher: asyncio.Task | None = None
        self._sleeping = False
        self._lock = asyncio.Lock()

    async def __call__(self, stage: str | None = None, message: str | None = None, level: str = "INFO") -> None:
        run = self.run
        run.raise_if_stopped()
        run.progressed()
        if message:
            logger.info("%s (epoch %d): %s", run.request_id, run.epoch, message)
            self.lines.append(LogEntry(message=message, level=level))  # type: ignore[arg-type]
        if stage:
            self.stage = stage
        if self.failing_since is not None and time.monotonic() - self.failing_since > self.lease_s:
            raise StoreUnreachableError(f"the jobs database refused the run's writes for over {self.lease_s:g} s")
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later())

    async def retry(self, work: WindowStep, attempt: int, error: BaseException) -> None:
        """The executor's ``on_retry``: a unit whose Denoiser replica failed or overran runs again elsewhere."""
        what = ("overran its timeout" if isinstance(error, TimeoutError)
                else f"failed ({type(error).__name__})")
        await self(message=f"window {work.window} step {work.step + 1} rows {list(work.rows)}: the Denoiser replica "
                           f"{what}; running it again on another replica (retry {attempt})", level="WARN")

    async def _flush_later(self) -> None:
        while self.lines or self.stage is not None:
            self._sleeping = True
            try:
                await asyncio.sleep(max(0.0, self._last_write + self.flush_s - time.monotonic()))
            finally:
                self._sleeping = False
            if not await self._write() and self.run.fenced:
                return

    async def flush(self) -> None:
        """Write what is buffered now (before the run is settled: its lines come before the store's last ones)."""
        if self._flusher is not None and self._sleeping:
            self._flusher.cancel()
        await self._write()

    def close(self) -> None:
        if self._flusher is not None and self._sleeping:
            self._flusher.cancel()

    async def _write(self) -> bool:
        async with self._lock:
            run = self.run
            if (not self.lines and self.stage is None) or run.fenced:
                return True
            lines, stage = self.lines[:MAX_LINES_PER_WRITE], self.stage
            del self.lines[:len(lines)]
            self.stage = None
            progress = run.step / run.total_steps if run.total_steps else 0.0
            try:
                cancel = await self.store.log_batch(run.request_id, run.epoch, lines, stage=stage, progress=progress,
                                                    lease_s=None if run.stalled else self.lease_s)
            except FencedError:
                refused(run, "log")
                return False
            except Exception as exc:
                self._last_write = time.monotonic()
                if not is_database_fault(exc):
                    logger.error("job %s: %d log lines could not be written", run.request_id, len(lines),
                                 exc_info=True)
                    return False
                self.lines[:0] = lines  # kept for the next write, in order
                self.stage = self.stage or stage
                self.failing_since = self.failing_since or self._last_write
                logger.warning("job %s: writing its progress failed (%s); trying again", run.request_id,
                               type(exc).__name__)
                return False
            self._last_write, self.failing_since = time.monotonic(), None
            if cancel:
                run.cancel_requested = True
            return True


Execute = Callable[[Run, RunReporter], Awaitable[StoredResult]]
Fingerprint = Callable[[], Awaitable[str]]


def job_error(exc: BaseException) -> JobError:
    """How a run's exception answers the job's result request (the same mapping as the sync route's)."""
    status, body = error_response(exc)
    detail = body["detail"]
    message = detail if isinstance(detail, str) else detail[0]["msg"]
    return JobError(status_code=status, detail=detail, message=message,
                    error_type="internal_error" if status >= 500 else "validation_error")


def refused(run: Run, write: str) -> None:
    """A write of ``run`` was refused by fencing (its lease moved on): the run stops, and the refusal is counted and
    logged (a stalled or partitioned replica's late writes are visible, and countable, per replica)."""
    run.fenced = True
    metrics.fenced_writes_total().inc(tags={"write": write})
    logger.warning("job %s (epoch %d): %s write refused by fencing, the lease moved on", run.request_id, run.epoch,
                   write)


async def _fixed(value: str) -> str:
    return value


class JobRunner:
    """Claims and runs jobs for one replica (``runner_id``); ``execute(run, report)`` does one job's work and
    returns its stored result after writing the objects it names. ``model_fingerprint`` (a string, or a coroutine
    function resolved before the first claim) names the model this replica runs: it claims only jobs submitted to
    it."""

    def __init__(self, store: JobStore, storage: Storage, args: AppArgs, runner_id: str, execute: Execute,
                 model_fingerprint: str | Fingerprint = "", may_claim: Callable[[int], bool] | None = None):
        self.store, self.storage, self.args, self.runner_id = store, storage, args, runner_id
        self.execute = execute
        # whether to claim another job while holding that many (default: fewer than max_running_jobs)
        self.may_claim = may_claim or (lambda held: held < args.max_running_jobs)
        self.dispatch, self.timeouts = args.dispatch, args.timeouts
        self._fingerprint_source = (model_fingerprint if callable(model_fingerprint)
                                    else lambda: _fixed(model_fingerprint))
        self._fingerprint: str | None = None
        self.runs: dict[str, Run] = {}
        self.queued_runs: set[asyncio.Task] = set()
        self._slot_freed = asyncio.Event()
        self.loop = BackgroundLoop(f"job-claims-{runner_id}", self._claim_loop)

    async def model_fingerprint(self) -> str:
        """This replica's model fingerprint (resolved once)."""
        if self._fingerprint is None:
            self._fingerprint = await self._fingerprint_source()
            logger.info("runner %s runs model %s", self.runner_id, self._fingerprint)
        return self._fingerprint

    # -- the claim loop ------------------------------------------------------------------------------------------
    async def _claim_loop(self) -> None:
        fingerprint = await self._known_fingerprint()
        idle_ticks = 0
        while True:
            claimed = None
            full = not self.may_claim(len(self.queued_runs))
            try:
                if not full:
                    claimed = await self.store.claim(self.runner_id, self.dispatch.lease_s,
                                                     model_fingerprint=fingerprint)
                    if claimed is not None:
                        self._start(claimed)
                else:  # full: claims would not run, but start deadlines and dead runners' leases still expire
                    await self.store.maintain()
                if idle_ticks % 10 == 0:
                    metrics.queue_length().set(await self.store.queue_length())
            except Exception:  # noqa: BLE001 - the database may be away for a while; keep trying
                logger.exception("runner %s: claim failed; trying again", self.runner_id)
                full = True  # pause as a full replica does: no wake-up from a database that just failed
            idle_ticks += 1
            if claimed is None:
                await self._pause(full)

    async def _known_fingerprint(self) -> str:
        """The model fingerprint, asked until it is known (the replica that computes it may still be starting):
        nothing is claimed before, since a claim takes only the jobs of its model."""
        while True:
            try:
                return await self.model_fingerprint()
            except Exception as exc:  # noqa: BLE001 - asked again, without a traceback per try
                logger.warning("runner %s: the model fingerprint is not known yet (%s); claiming nothing until it is",
                               self.runner_id, type(exc).__name__)
                await asyncio.sleep(max(self.dispatch.poll_interval_s, 5.0))

    async def _pause(self, full: bool) -> None:
        """Between claims: a full replica waits for one of its runs to end; an idle one for a submit's NOTIFY
        (PostgreSQL, ``dispatch.listen``); either at most ``poll_interval_s`` (polling stays the fallback)."""
        timeout = self.dispatch.poll_interval_s
        if full or not self.dispatch.listen:
            self._slot_freed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._slot_freed.wait()
            return
        try:
            await self.store.wait_for_job(timeout, model_fingerprint=await self.model_fingerprint())
        except Exception:  # noqa: BLE001 - the listener reconnects by itself; poll meanwhile
            logger.warning("runner %s: waiting for a job notification failed; polling", self.runner_id,
                           exc_info=True)
            await asyncio.sleep(timeout)

    def _start(self, job: ClaimedJob) -> None:
        logger.info("runner %s claimed %s (epoch %d, attempt %d)", self.runner_id, job.request_id, job.epoch,
                    job.attempts)
        if job.attempts == 1:
            metrics.time_in_queue().observe(max(0.0, job.started_at - job.created_at))
        task = asyncio.get_running_loop().create_task(self._run_queued(Run(job)))
        self.queued_runs.add(task)
        task.add_done_callback(self._run_ended)

    def _run_ended(self, task: asyncio.Task) -> None:
        self.queued_runs.discard(task)
        self._slot_freed.set()

    async def _run_queued(self, run: Run) -> None:
        with contextlib.suppress(Exception, asyncio.CancelledError):  # settled and logged in supervise
            await self.supervise(run)

    # -- one run -------------------------------------------------------------------------------------------------
    async def supervise(self, run: Run) -> StoredResult:
        """Run ``run`` to its end and settle it in the database; returns the stored result or re-raises why it
        did not finish (the sync route answers with it)."""
        self.runs[run.request_id] = run
        metrics.running_jobs().set(len(self.runs))
        report = RunReporter(self.store, run, self.dispatch.lease_s, self.dispatch.log_flush_s)
        job = run.job
        # the deadline counts from the job's first start (its earlier attempts included), on the database's clock
        ran_before = max(0.0, job.lease_expires_at - self.dispatch.lease_s - job.started_at)
        run.deadline = time.monotonic() + self.timeouts.job_s - ran_before
        run.work = asyncio.ensure_future(self._execute(run, report))
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
                        await self._commit(run, report, run.work.result())
                        raise
                why = await self._settle_interrupted(run, report)
                if caller_left or asyncio.current_task().cancelling():
                    raise
                raise why from None
            except JobCancelled:
                await self._settle_interrupted(run, report)
                raise
            except FencedError:
                run.fenced = True
                logger.warning("runner %s lost the lease of %s (epoch %d); stopping", self.runner_id,
                               run.request_id, run.epoch)
                raise
            except Exception as exc:
                await self._settle_failure(run, report, exc)
                raise
            return await self._commit(run, report, stored)
        finally:
            keeper.cancel()
            report.close()
            try:  # a run counts as running until what it left is cleaned up (a stop waits for its runs)
                await self._clean_up(run)
            finally:
                self.runs.pop(run.request_id, None)
                metrics.running_jobs().set(len(self.runs))

    async def _execute(self, run: Run, report: RunReporter) -> StoredResult:
        if time.monotonic() >= run.deadline:  # claimed again after its deadline passed: do not start
            run.timed_out = True
            raise asyncio.CancelledError()
        return await self.execute(run, report)

    async def _keep_lease(self, run: Run) -> None:
        """Renew the lease while the run makes progress; stop the work on a cancel request, a lost lease, a stall
        (then the lease is no longer renewed: the job is retried) or the job deadline."""
        stall_s = self.timeouts.stall_s
        while True:
            await asyncio.sleep(self.dispatch.heartbeat_s)
            now = time.monotonic()
            if now >= run.deadline and not run.timed_out:
                run.timed_out = True
                logger.warning("job %s passed its deadline (timeouts.job_s %g s); stopping", run.request_id,
                               self.timeouts.job_s)
            if not run.stalled and run.stalled_for(now) > stall_s:
                run.stalled = True
                logger.warning("job %s made no progress for %.0f s (timeouts.stall_s); its lease is no longer "
                               "renewed", run.request_id, run.stalled_for(now))
            if not (run.fenced or run.stalled):
                try:
                    run.cancel_requested |= await self.store.heartbeat(run.request_id, run.epoch,
                                                                       self.dispatch.lease_s)
                except FencedError:
                    refused(run, "heartbeat")
                except Exception:  # noqa: BLE001 - a database hiccup: the lease has room for a few misses
                    logger.warning("runner %s: heartbeat of %s failed; retrying", self.runner_id, run.request_id,
                                   exc_info=True)
                    continue
            if run.stopping and run.stop_now():
                return

    # -- checkpoints ---------------------------------------------------------------------------------------------
    async def checkpoint(self, run: Run, steps_done: int, save: Callable[[str], object]) -> None:
        """Write a checkpoint taken after ``steps_done`` steps under a key of its own (``save(key)`` writes it, in
        a thread), then name it on the row; the one it replaced is deleted once the row names the new one. A
        refused write (the lease was lost) leaves the row as it was, and only our own new object is deleted."""
        key = checkpoint_key(run.request_id, run.epoch, steps_done)
        run.uncommitted.add(key)
        async with run.writing_objects():
            await asyncio.to_thread(save, key)
        await to_the_end(self._name_checkpoint(run, key, steps_done))

    async def _name_checkpoint(self, run: Run, key: str, steps_done: int) -> None:
        try:
            replaced = await self.store.record_checkpoint(run.request_id, run.epoch, key, steps_done)
        except FencedError:
            refused(run, "checkpoint")
            raise
        except Exception as exc:
            if not is_database_fault(exc):
                raise
            # Its COMMIT may have landed: the row names the new key or still the old one. Delete neither now.
            run.uncommitted.discard(key)
            run.unsure.add(key)
            logger.warning("job %s: recording the checkpoint after step %d failed (%s); the run goes on",
                           run.request_id, steps_done, type(exc).__name__)
            return
        run.uncommitted.discard(key)
        if replaced is not None:
            run.unsure.discard(replaced)
            await self._delete({replaced})  # no row names it any more

    # -- how the run ended ---------------------------------------------------------------------------------------
    async def _commit(self, run: Run, report: RunReporter, stored: StoredResult) -> StoredResult:
        """Complete the job with ``stored``, to the end even when the run is cancelled meanwhile (then the
        cancellation is raised after): the video stays exactly when the row names it."""
        return await to_the_end(self._complete(run, report, stored))

    async def _complete(self, run: Run, report: RunReporter, stored: StoredResult) -> StoredResult:
        key = stored.video.key
        await report.flush()
        try:
            job = await self.store.complete(run.request_id, run.epoch, result=stored.model_dump(),
                                            result_keys=[key])
        except FencedError:  # another runner finished it, or it was cancelled meanwhile: ours is surplus
            refused(run, "complete")
            raise
        except Exception as exc:
            if not is_database_fault(exc):
                raise
            job = await self._completion_after(run, stored, exc)
        run.uncommitted.discard(key)
        metrics.jobs_total().inc(tags={"outcome": "completed"})
        if job.completed_at is not None:
            metrics.job_latency().observe(job.completed_at - job.created_at)
        return stored

    async def _completion_after(self, run: Run, stored: StoredResult, error: BaseException):
        """``complete`` failed on a database error, and its COMMIT may have landed with the reply lost: read back
        whether it did (then the row names the result: it must stay) or complete again. When the database cannot
        tell us within the lease, the result object is left alone (the orphan sweep deletes it if no row names
        it) and the run ends on the fault."""
        key = stored.video.key
        logger.warning("job %s: completing it failed (%s); reading back whether it committed", run.request_id,
                       type(error).__name__)
        pause, give_up = SETTLE_PAUSE_S, time.monotonic() + self.dispatch.lease_s
        while True:
            try:
                landed = await self.store.completion(run.request_id, run.epoch)
                if landed is not None:
                    return landed
                return await self.store.complete(run.request_id, run.epoch, result=stored.model_dump(),
                                                 result_keys=[key])
            except FencedError:  # finished by the store or another runner, not by us: ours is surplus
                refused(run, "complete")
                raise
            except Exception as exc:
                if not is_database_fault(exc) or time.monotonic() > give_up:
                    run.uncommitted.discard(key)
                    raise
            await asyncio.sleep(pause)
            pause *= 2

    async def _settle_failure(self, run: Run, report: RunReporter, exc: BaseException) -> None:
        """An exception ended the run: an infrastructure fault lets the job go for a retry, anything else fails
        it at once."""
        fault = fault_class(exc)
        if fault is None:
            error = job_error(exc)
            if error.status_code >= 500:
                logger.error("job %s failed on %s", run.request_id, self.runner_id, exc_info=exc)
            await self._finish(run, report, error, "failed")
            return
        logger.warning("job %s: attempt %d on %s ended on a %s fault; letting it go for a retry", run.request_id,
                       run.job.attempts, self.runner_id, fault, exc_info=exc)
        await self._retry(run, report, fault, infrastructure_error(fault, exc))

    async def _retry(self, run: Run, report: RunReporter, fault: str, error: JobError) -> None:
        backoff = min(self.dispatch.retry_backoff_max_s,
                      self.dispatch.retry_backoff_s * 2 ** max(0, run.job.attempts - 1))
        await report.flush()
        job = await self._settling_write(run, "retry", lambda: self.store.retry(
            run.request_id, run.epoch, error=error, error_class=fault, backoff_s=backoff))
        if job is not None:
            outcome = "retried" if not job.finished else "dead_letter" if job.dead_letter else job.outcome
            metrics.jobs_total().inc(tags={"outcome": outcome or "failed"})

    async def _settle_interrupted(self, run: Run, report: RunReporter) -> BaseException:
        """The work stopped before its end; returns what the run ended on. A cancelled job ends cancelled; a job
        past its deadline fails; a stalled run is retried; a queued job of a replica that shuts down goes back to
        the queue (it resumes elsewhere); a sync job whose caller left is cancelled."""
        if run.fenced:
            return FencedError(run.request_id, run.epoch, "heartbeat")
        if run.timed_out and not run.cancel_requested:
            await self._finish(run, report, job_deadline_error(self.timeouts.job_s), "failed")
            return TimeoutError(f"job {run.request_id} passed its deadline")
        if run.stalled and not run.cancel_requested:
            stalled = RunStalledError(f"no progress for {self.timeouts.stall_s:g} s (timeouts.stall_s)")
            await self._retry(run, report, "stalled", infrastructure_error("stalled", stalled))
            return stalled
        if run.handing_back and not run.cancel_requested:
            await report.flush()
            await self._settling_write(run, "release", lambda: self.store.release(
                run.request_id, run.epoch, f"the runner {self.runner_id} is shutting down"))
            return asyncio.CancelledError()
        await self._finish(run, report, cancelled_error(), "cancelled")
        return JobCancelled(run.request_id)

    async def _finish(self, run: Run, report: RunReporter, error: JobError, outcome: str) -> None:
        await report.flush()
        if await self._settling_write(run, "complete", lambda: self.store.complete(
                run.request_id, run.epoch, error=error)) is not None:
            metrics.jobs_total().inc(tags={"outcome": outcome})

    async def _settling_write(self, run: Run, what: str, write: Callable[[], Awaitable[R]]) -> R | None:
        """A write that ends the run, tried again on database errors while the lease lasts (a second try of one
        whose COMMIT had landed is refused: FencedError, as for any lease lost). None when fenced, or when the
        database stayed away: then the lease runs out and the job is claimed again."""
        pause, give_up = SETTLE_PAUSE_S, time.monotonic() + self.dispatch.lease_s
        while True:
            try:
                return await write()
            except FencedError:
                refused(run, what)
                return None
            except Exception as exc:
                if not is_database_fault(exc):
                    raise
                if time.monotonic() > give_up:
                    logger.error("job %s: the %s write kept failing (%s); its lease will run out and the job be "
                                 "claimed again", run.request_id, what, type(exc).__name__)
                    return None
            await asyncio.sleep(pause)
            pause *= 2

    async def _clean_up(self, run: Run) -> None:
        """Delete what the run wrote that no row names: its objects whose naming write was refused or never made,
        and those whose naming write was ambiguous, once the database says no row names them."""
        await self._delete(run.uncommitted)
        if run.unsure:
            try:
                named = await self.store.named_keys(sorted(run.unsure))
            except Exception:  # noqa: BLE001 - the orphan sweep deletes whatever no row names
                logger.warning("job %s: could not check %d objects; left to retention", run.request_id,
                               len(run.unsure), exc_info=True)
                return
            await self._delete(run.unsure - named)

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
