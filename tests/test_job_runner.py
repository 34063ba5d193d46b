"""The runner inside every Orchestrator replica, without Ray: a real SQLite jobs database (PostgreSQL for the
wake-up), real local storage, and a stand-in for the pipeline that writes objects the way the Orchestrator does
(object first, then the row; checkpoints through the runner).

What must hold: a cancel request or a lost lease never cuts an object write short (no orphan object); a runner
that lost its lease deletes what it wrote and the winner's result is the only one; a replica that shuts down hands
its queued jobs back; a sync caller that leaves ends its job cancelled.

And the faults of a real cluster (issue 18), injected where they strike: a transient database error from a
progress report or a checkpoint record never fails the job; a lost COMMIT reply never deletes the committed result,
nor does a replica stopping or a sync caller leaving while a completion or a checkpoint record commits; a fenced
runner never deletes the checkpoint the new runner resumes from; infrastructure faults are retried from the
checkpoint with every attempt recorded, up to a dead letter an operator can re-queue, while input errors fail at
once; a stalled run lets go of its lease; a job past its deadline fails; claims take only their model's jobs; an
idle runner on PostgreSQL claims a new job without waiting for its poll; log lines are written in batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.exceptions import ReplicaUnavailableError

from deployments.config import AppArgs
from deployments.contracts import JobCancelled, StoredResult, StoredVideo
from deployments.jobstore import (
    FencedError,
    JobStore,
    PostgresJobsConfig,
    SqliteJobsConfig,
    make_job_store,
)
from deployments.orchestrator import faults
from deployments.orchestrator.faults import StageTimeoutError, UnitTimeoutError, fault_class
from deployments.orchestrator.runner import JobRunner, Run, RunReporter
from deployments.storage import LocalStorage, LocalStorageConfig, StorageError, StorageNotFoundError
from deployments.storage.keys import checkpoint_key, result_key
from pipeline.media.errors import MediaError

INPUT = {"request": {"image_url": "https://example.invalid/a.png", "audio_url": "https://example.invalid/a.wav",
                     "prompt": "hi"}, "stored": {}}


class Pipeline:
    """Stands in for the Orchestrator's ``_execute``: a few reported steps, a slow result write, a result."""

    def __init__(self, storage: LocalStorage, steps: int = 3, step_s: float = 0.05, write_s: float = 0.0,
                 block: asyncio.Event | None = None):
        self.storage, self.steps, self.step_s, self.write_s, self.block = storage, steps, step_s, write_s, block
        self.writes_finished: list[str] = []
        self.writing = asyncio.Event()

    def _write(self, key: str) -> None:  # a thread, as storage writes are: cancelling the caller does not stop it
        time.sleep(self.write_s)
        self.storage.put_bytes(key, b"video", "video/mp4")
        self.writes_finished.append(key)

    async def __call__(self, run: Run, report: RunReporter) -> dict[str, Any]:
        run.total_steps = self.steps
        await report(stage="denoising", message=f"on epoch {run.epoch}")
        for step in range(self.steps):
            await asyncio.sleep(self.step_s)
            run.step = step + 1
            await report(message=f"step {step + 1}")
        if self.block is not None:
            await self.block.wait()
        key = result_key(run.request_id, run.epoch)
        run.uncommitted.add(key)
        async with run.writing_objects(final=True):
            self.writing.set()
            await asyncio.to_thread(self._write, key)
        return StoredResult(video=StoredVideo(key=key, file_size=5), seed=run.job.seed)


DISPATCH = {"lease_s": 1.0, "heartbeat_s": 0.2, "poll_interval_s": 0.05, "webhook_lease_s": 20,
            "retry_backoff_s": 0.05, "log_flush_s": 0.0}


def runner_args(tmp_path: Path, **extra: Any) -> AppArgs:
    dispatch = DISPATCH | extra.pop("dispatch", {})
    return AppArgs(storage=LocalStorageConfig(root=tmp_path / "data"), max_running_jobs=1, dispatch=dispatch,
                   **extra)


@pytest.fixture
def env(tmp_path: Path):
    args = runner_args(tmp_path)
    stores: list[JobStore] = []

    def open_store(config: Any = None, limits_args: AppArgs = args) -> JobStore:
        store = make_job_store(config or SqliteJobsConfig(synchronous="NORMAL"), tmp_path / "jobs.sqlite3",
                               limits_args.job_limits())
        stores.append(store)
        return store

    yield args, open_store, LocalStorage(args.storage)
    for store in stores:
        store.close()


def objects(storage: LocalStorage, prefix: str = "results/") -> list[str]:
    return storage.list_keys(prefix)


async def wait_until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


@contextlib.contextmanager
def logged_warnings() -> Iterator[list[str]]:
    """The runner's WARN lines (its logger, "ray.serve", does not reach pytest's capture once Ray configured it)."""
    lines: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("ray.serve")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def test_a_cancel_during_the_result_write_waits_for_it_then_deletes_it(env):
    args, open_store, storage = env

    async def scenario() -> None:
        store = open_store()
        pipeline = Pipeline(storage, write_s=0.8)  # the write spans several heartbeats
        runner = JobRunner(store, storage, args, "runner-a", pipeline)
        submitted = await store.submit(app_id="a", input=INPUT, seed=1, rate_limited=False)
        runner.loop.ensure_running()
        await asyncio.wait_for(pipeline.writing.wait(), 10)
        assert await store.cancel(submitted.request_id) == "CANCELLATION_REQUESTED"
        await wait_until(lambda: store.sync.get(submitted.request_id).status == "COMPLETED")
        job = store.sync.get(submitted.request_id)
        assert job.error.error_type == "client_cancelled" and job.result is None
        assert pipeline.writes_finished == [result_key(submitted.request_id, 1)]  # the write was not cut short
        await wait_until(lambda: objects(storage) == [])  # ... and its object did not outlive the job
        await runner.stop()

    asyncio.run(scenario())


def test_a_cancel_seen_by_the_heartbeat_stops_a_run_inside_a_long_unit(env):
    """A run may wait minutes in one call (a Denoiser unit of a long video) with no report to notice a cancel
    request: the heartbeat sees it and stops the run there. What the run wrote that no row names is deleted and the
    job ends cancelled, its runner free for the next job."""
    args, open_store, storage = env

    async def scenario() -> None:
        store = open_store()
        in_unit, unit_cancelled, written = asyncio.Event(), asyncio.Event(), []

        async def long_unit(run: Run, report: RunReporter) -> StoredResult:
            run.total_steps = 1
            await report(stage="denoising", message="step 1 of 1")
            segment = f"results/{run.request_id}/e{run.epoch}/segment-0.mp4"  # a finished part of the video
            run.uncommitted.add(segment)
            await asyncio.to_thread(storage.put_bytes, segment, b"part", "video/mp4")
            written.append(segment)
            in_unit.set()
            try:
                await asyncio.Event().wait()  # the unit: ends only when the run is stopped
            except asyncio.CancelledError:
                unit_cancelled.set()
                raise
            raise AssertionError("the unit cannot finish")

        runner = JobRunner(store, storage, args, "runner-a", long_unit)
        submitted = await store.submit(app_id="a", input=INPUT, seed=1, rate_limited=False)
        runner.loop.ensure_running()
        await asyncio.wait_for(in_unit.wait(), 10)
        assert objects(storage) == written
        assert await store.cancel(submitted.request_id) == "CANCELLATION_REQUESTED"
        # heartbeats every 0.2 s: the bound is generous for a loaded machine, and a run nobody stops never ends
        await asyncio.wait_for(unit_cancelled.wait(), 10)
        await wait_until(lambda: store.sync.get(submitted.request_id).status == "COMPLETED")
        job = store.sync.get(submitted.request_id)
        assert job.error.error_type == "client_cancelled" and job.result is None and job.attempts == 1
        await wait_until(lambda: not runner.runs and objects(storage) == [])
        await runner.stop()

    asyncio.run(scenario())


def test_a_runner_that_lost_its_lease_deletes_its_result_and_the_winner_keeps_one(env):
    args, open_store, storage = env

    async def scenario() -> None:
        store_a, store_b = open_store(), open_store()
        release_a = asyncio.Event()
        slow = Pipeline(storage, block=release_a)
        runner_a = JobRunner(store_a, storage, args, "runner-a", slow)
        submitted = await store_a.submit(app_id="a", input=INPUT, seed=1, rate_limited=False)
        runner_a.loop.ensure_running()
        await wait_until(lambda: submitted.request_id in runner_a.runs)

        async def partitioned(*_args, **_kwargs):  # runner A can no longer reach the database for heartbeats
            raise OSError("network partition")

        store_a.heartbeat = partitioned
        runner_b = JobRunner(store_b, storage, args, "runner-b", Pipeline(storage))
        runner_b.loop.ensure_running()  # claims the job once A's lease ran out (epoch 2) and finishes it
        await wait_until(lambda: store_b.sync.get(submitted.request_id).status == "COMPLETED", 15)
        with logged_warnings() as warnings:
            release_a.set()  # A wakes up, writes its result under epoch 1, and its completion is refused
            # the run is dropped from ``runs`` before its clean-up deletes its object
            await wait_until(lambda: not runner_a.runs and len(objects(storage)) == 1, 10)
        assert f"job {submitted.request_id} (epoch 1): complete write refused by fencing, the lease moved on" in \
            warnings  # counted too (stable_avatar_fenced_writes_total): the soak counts these lines
        job = store_b.sync.get(submitted.request_id)
        assert job.error is None and job.epoch == 2 and job.attempts == 2
        assert objects(storage) == job.result_keys == [result_key(submitted.request_id, 2)]
        assert slow.writes_finished == [result_key(submitted.request_id, 1)]  # written, then deleted
        log = [line.message for line in store_b.sync.logs(submitted.request_id).lines]
        assert "the runner runner-a stopped renewing its lease" in "\n".join(log)
        await runner_a.stop()
        await runner_b.stop()

    asyncio.run(scenario())


def test_a_stopping_runner_hands_its_queued_job_back(env):
    args, open_store, storage = env

    async def scenario() -> None:
        store = open_store()
        runner = JobRunner(store, storage, args, "runner-a", Pipeline(storage, steps=200, step_s=0.05))
        submitted = await store.submit(app_id="a", input=INPUT, seed=1, rate_limited=False)
        runner.loop.ensure_running()
        await wait_until(lambda: (store.sync.get(submitted.request_id).progress or 0) > 0)
        await runner.stop()
        job = store.sync.get(submitted.request_id)
        assert job.status == "IN_QUEUE" and job.attempts == 0  # queued again in its place, the attempt refunded
        assert "the runner runner-a is shutting down" in "\n".join(
            line.message for line in store.sync.logs(submitted.request_id).lines)
        assert objects(storage) == []

    asyncio.run(scenario())



def test_a_stop_that_comes_as_a_run_ends_stops_the_claim_loop(env):
    """A full runner's claim loop pauses until a run ends or the poll interval passes; the stop's cancellation
    that arrives in the very tick the run's end wakes that pause must still end the loop (a swallowed one keeps it claiming, and
    the replica's shutdown waits for ever)."""
    args, open_store, storage = env

    async def scenario() -> None:
        store = open_store()
        paused = asyncio.Event()
        queue_length = store.queue_length

        async def counted() -> int:  # the claim loop's last await before it pauses
            try:
                return await queue_length()
            finally:
                paused.set()

        store.queue_length = counted  # type: ignore[method-assign]
        runner = JobRunner(store, storage, runner_args(Path(args.storage.root).parent,
                                                       dispatch={"poll_interval_s": 30.0}),
                           "runner-a", Pipeline(storage), may_claim=lambda held: False)  # full: waits for a run
        runner.loop.ensure_running()
        await asyncio.wait_for(paused.wait(), 10)
        for _ in range(3):
            await asyncio.sleep(0)  # the loop is inside its pause now
        runner._run_ended(asyncio.get_running_loop().create_future())  # a run ends: the pause's wake-up ...
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # ... is on its way to the claim loop when the stop comes (in this very step)
        assert await runner.loop.stop(timeout_s=2.0)  # the claim loop ended (not left behind, still claiming)
        await runner.stop()

    asyncio.run(scenario())


async def start_slow_sync_job(store, storage, args):
    """A sync job (200 steps of 50 ms) supervised by runner-a, returned once it has made progress."""
    runner = JobRunner(store, storage, args, "runner-a", Pipeline(storage, steps=200, step_s=0.05))
    claimed = await store.create_sync(app_id="a", input=INPUT, seed=1, runner_id="runner-a", lease_s=1.0,
                                      rate_limited=False)
    caller = asyncio.ensure_future(runner.supervise(Run(claimed)))
    await wait_until(lambda: (store.sync.get(claimed.request_id).progress or 0) > 0)
    return claimed, caller


def test_a_sync_caller_that_leaves_ends_its_job_cancelled(env):
    args, open_store, storage = env

    async def scenario() -> None:
        store = open_store()
        claimed, caller = await start_slow_sync_job(store, storage, args)
        caller.cancel()  # the HTTP client went away
        with pytest.raises(asyncio.CancelledError):
            await caller
        job = store.sync.get(claimed.request_id)
        assert job.status == "COMPLETED" and job.error.error_type == "client_cancelled"

    asyncio.run(scenario())


def test_a_cancel_request_reaches_a_sync_job_as_jobcancelled(env):
    args, open_store, storage = env

    async def scenario() -> None:
        store = open_store()
        claimed, caller = await start_slow_sync_job(store, storage, args)
        started = time.monotonic()
        await store.cancel(claimed.request_id)
        with pytest.raises(JobCancelled):
            await caller
        # Seen at the next step report (or heartbeat): well before the 10 s the job would take, with room for a
        # loaded machine.
        assert time.monotonic() - started < 5.0
        assert store.sync.get(claimed.request_id).error.error_type == "client_cancelled"
        with pytest.raises(FencedError):  # the run is over: nothing more can be written under its epoch
            await store.heartbeat(claimed.request_id, claimed.epoch, 1.0)

    asyncio.run(scenario())


def test_heartbeats_keep_a_long_job_claimed_by_its_runner(env):
    args, open_store, storage = env

    async def scenario() -> None:
        store = open_store()
        runner = JobRunner(store, storage, args, "runner-a", Pipeline(storage, steps=1, step_s=3.0))  # > lease
        other = JobRunner(open_store(), storage, args, "runner-b", Pipeline(storage))
        submitted = await store.submit(app_id="a", input=INPUT, seed=1, rate_limited=False)
        runner.loop.ensure_running()
        await wait_until(lambda: submitted.request_id in runner.runs)
        other.loop.ensure_running()  # polls the whole time: it must never get the job
        await wait_until(lambda: store.sync.get(submitted.request_id).status == "COMPLETED", 15)
        job = store.sync.get(submitted.request_id)
        assert job.error is None and (job.epoch, job.attempts) == (1, 1)
        await runner.stop()
        await other.stop()

    asyncio.run(scenario())


# -- the faults of a real cluster ---------------------------------------------------------------------------------
StepHook = Callable[[Run, int], Awaitable[None]]


class Checkpointing:
    """Stands in for the Orchestrator's ``_execute`` with checkpoints: resumes after the job's checkpoint (whose
    bytes must be the ones written for it), checkpoints through the runner after every ``every`` steps but the
    last, calls ``before_step(run, step)`` first at every step, then writes the result."""

    def __init__(self, storage: LocalStorage, steps: int = 4, every: int = 1, step_s: float = 0.02,
                 before_step: StepHook | None = None):
        self.storage, self.steps, self.every, self.step_s, self.before_step = storage, steps, every, step_s, before_step
        self.runner: JobRunner | None = None
        self.resumed_from: list[int | None] = []

    @staticmethod
    def content(request_id: str, epoch: int, steps_done: int) -> bytes:
        return f"{request_id} epoch {epoch} after {steps_done} steps".encode()

    async def __call__(self, run: Run, report: RunReporter) -> StoredResult:
        job, start = run.job, run.job.checkpoint_step or 0
        if job.checkpoint_key is not None:
            stored = await asyncio.to_thread(self.storage.get_bytes, job.checkpoint_key)
            assert stored.endswith(f"after {start} steps".encode()), stored
        self.resumed_from.append(job.checkpoint_step)
        run.total_steps, run.step = self.steps, start
        await report(stage="denoising", message=f"epoch {run.epoch} starts at step {start}")
        for step in range(start, self.steps):
            if self.before_step is not None:
                await self.before_step(run, step)
            await asyncio.sleep(self.step_s)
            run.step = step + 1
            await report(message=f"step {step + 1}")
            if run.step % self.every == 0 and run.step < self.steps:
                data = self.content(run.request_id, run.epoch, run.step)
                await self.runner.checkpoint(run, run.step, lambda key, data=data: self.storage.put_bytes(
                    key, data, "application/octet-stream"))
        key = result_key(run.request_id, run.epoch)
        run.uncommitted.add(key)
        async with run.writing_objects(final=True):
            await asyncio.to_thread(self.storage.put_bytes, key, b"video", "video/mp4")
        return StoredResult(video=StoredVideo(key=key, file_size=5), seed=job.seed)


def checkpointing_runner(store: JobStore, storage: LocalStorage, args: AppArgs, name: str,
                         pipeline: Checkpointing, model_fingerprint: str = "") -> JobRunner:
    runner = JobRunner(store, storage, args, name, pipeline, model_fingerprint=model_fingerprint)
    pipeline.runner = runner
    return runner


def fail_once(store: JobStore, names: tuple[str, ...], error: BaseException, after_commit: bool = False) -> list:
    """The first call of any of ``names`` on ``store`` raises ``error`` (``after_commit``: once its transaction
    committed, as when the COMMIT's reply is lost); returns the list of calls that failed."""
    failed: list[str] = []
    for name in names:
        real = getattr(store, name)

        async def flaky(*args, _real=real, _name=name, **kwargs):
            if failed:
                return await _real(*args, **kwargs)
            failed.append(_name)
            if after_commit:
                await _real(*args, **kwargs)
            raise error

        setattr(store, name, flaky)
    return failed


def attempts_of(store: JobStore, request_id: str) -> list[tuple[int, str | None, str | None]]:
    return [(a.epoch, a.outcome, a.error_class) for a in store.sync.attempts(request_id)]


def log_of(store: JobStore, request_id: str) -> str:
    return "\n".join(line.message for line in store.sync.logs(request_id).lines)


async def run_to_the_end(store: JobStore, runners: list[JobRunner], request_id: str, timeout_s: float = 20) -> Any:
    for runner in runners:
        runner.loop.ensure_running()
    await wait_until(lambda: store.sync.get(request_id).status == "COMPLETED", timeout_s)
    await wait_until(lambda: all(not runner.runs for runner in runners), 10)
    for runner in runners:
        await runner.stop()
    return store.sync.get(request_id)


LOCKED = sqlite3.OperationalError("database is locked")


def test_a_database_error_from_a_progress_report_does_not_fail_the_job(env):
    """One "database is locked" from a progress or log write is a transient fault, not the job's end (a 500)."""
    args, open_store, storage = env

    async def scenario() -> None:
        store = open_store()
        failed = fail_once(store, ("report", "log", "log_batch"), LOCKED)
        submitted = await store.submit(app_id="a", input=INPUT, seed=1, rate_limited=False)
        job = await run_to_the_end(store, [JobRunner(store, storage, args, "runner-a", Pipeline(storage))],
                                   submitted.request_id)
        assert failed  # the fault struck
        assert job.error is None and (job.epoch, job.attempts) == (1, 1)  # the same attempt went on
        assert objects(storage) == job.result_keys == [result_key(submitted.request_id, 1)]
        assert "step 3" in log_of(store, submitted.request_id)  # lines kept through the failed write

    asyncio.run(scenario())


@pytest.mark.parametrize("lost_reply", [False, True], ids=["refused", "commit-reply-lost"])
def test_a_database_error_when_recording_a_checkpoint_does_not_fail_the_job(env, lost_reply):
    """Defect 1 for checkpoints: the run goes on; the checkpoint whose record was ambiguous is kept while a row
    may name it and deleted once none does, so the job ends with only the objects its row names."""
    args, open_store, storage = env

    async def scenario() -> None:
        store = open_store()
        failed = fail_once(store, ("record_checkpoint",), LOCKED, after_commit=lost_reply)
        pipeline = Checkpointing(storage, steps=4)
        submitted = await store.submit(app_id="a", input=INPUT, seed=1, rate_limited=False)
        job = await run_to_the_end(store, [checkpointing_runner(store, storage, args, "runner-a", pipeline)],
                                   submitted.request_id)
        request_id = submitted.request_id
        assert failed == ["record_checkpoint"]
        assert job.error is None and job.attempts == 1
        named = checkpoint_key(request_id, 1, 3)  # the last checkpoint (after step 3 of 4) is the row's
        assert job.checkpoint_step == 3
        assert objects(storage, "checkpoints/") == [named]
        assert objects(storage) == job.result_keys

    asyncio.run(scenario())


def test_a_lost_commit_reply_of_the_completion_keeps_the_committed_result(env):
    """``complete`` committed but its reply was lost: the runner must not delete the object it still counts as
    uncommitted, or a succeeded job's result link would be broken."""
    args, open_store, storage = env

    async def scenario() -> None:
        store = open_store()
        lost = OSError("server closed the connection unexpectedly")
        failed = fail_once(store, ("complete",), sqlite3.OperationalError(str(lost)), after_commit=True)
        submitted = await store.submit(app_id="a", input=INPUT, seed=1, rate_limited=False)
        job = await run_to_the_end(store, [JobRunner(store, storage, args, "runner-a", Pipeline(storage))],
                                   submitted.request_id)
        assert failed == ["complete"]
        assert job.error is None and job.result_keys == [result_key(submitted.request_id, 1)]
        assert objects(storage) == job.result_keys  # the object the row names is there
        assert storage.get_bytes(job.result_keys[0]) == b"video"

    asyncio.run(scenario())


def slow_reply(store: JobStore, name: str, delay_s: float = 0.5) -> asyncio.Event:
    """``store.<name>`` commits at once but answers ``delay_s`` later (a slow network): a caller cancelled meanwhile
    does not stop the write, which runs in a thread. Returns an event set once the write has committed."""
    committed = asyncio.Event()
    write = getattr(store.sync, name)
    loop = asyncio.get_running_loop()

    def commit_then_answer(*args: Any, **kwargs: Any) -> Any:
        result = write(*args, **kwargs)
        loop.call_soon_threadsafe(committed.set)
        time.sleep(delay_s)
        return result

    async def slow(*args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(commit_then_answer, *args, **kwargs)

    setattr(store, name, slow)
    return committed


@pytest.mark.parametrize("interruption", ["the replica stops", "the sync caller leaves"])
def test_an_interruption_while_the_completion_commits_keeps_the_result_it_names(env, interruption):
    """The run is cancelled (the replica shuts down, the HTTP caller went away) after its completion committed but
    before its reply came: the runner waits for that reply instead of deleting the video as unnamed, so the
    succeeded job's result stays."""
    args, open_store, storage = env

    async def scenario() -> None:
        store = open_store()
        committed = slow_reply(store, "complete")
        runner = JobRunner(store, storage, args, "runner-a", Pipeline(storage))
        if interruption == "the replica stops":
            request_id = (await store.submit(app_id="a", input=INPUT, seed=1, rate_limited=False)).request_id
            runner.loop.ensure_running()
            await asyncio.wait_for(committed.wait(), 10)
            await runner.stop()
        else:
            claimed = await store.create_sync(app_id="a", input=INPUT, seed=1, runner_id="runner-a", lease_s=1.0,
                                              rate_limited=False)
            request_id = claimed.request_id
            caller = asyncio.ensure_future(runner.supervise(Run(claimed)))
            await asyncio.wait_for(committed.wait(), 10)
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
        await wait_until(lambda: not runner.runs)
        job = store.sync.get(request_id)
        assert (job.status, job.error, job.result_keys) == ("COMPLETED", None, [result_key(request_id, 1)])
        assert objects(storage) == job.result_keys, "the video the row names was deleted"
        assert storage.get_bytes(job.result_keys[0]) == b"video"

    asyncio.run(scenario())


def test_a_stop_while_a_checkpoint_is_recorded_keeps_the_checkpoint_the_row_names(env):
    """The replica shuts down after a checkpoint's record committed but before its reply came: the job is handed
    back naming that checkpoint, and the object is still there for the next runner to resume from."""
    args, open_store, storage = env

    async def scenario() -> None:
        store = open_store()
        committed = slow_reply(store, "record_checkpoint")
        runner = checkpointing_runner(store, storage, args, "runner-a", Checkpointing(storage, steps=20))
        request_id = (await store.submit(app_id="a", input=INPUT, seed=1, rate_limited=False)).request_id
        runner.loop.ensure_running()
        await asyncio.wait_for(committed.wait(), 10)
        await runner.stop()
        assert store.sync.get(request_id).status == "IN_QUEUE"  # handed back
        job = store.sync.claim("runner-b", 30)  # as the next runner finds it
        assert (job.request_id, job.checkpoint_step, job.checkpoint_key) == (
            request_id, 1, checkpoint_key(request_id, 1, 1))
        assert objects(storage, "checkpoints/") == [job.checkpoint_key], "the checkpoint the row names was deleted"
        assert storage.get_bytes(job.checkpoint_key) == Checkpointing.content(request_id, 1, 1)

    asyncio.run(scenario())


def test_a_fenced_runner_never_deletes_the_checkpoint_the_new_runner_resumes_from(env):
    """Defect 3: a stalled runner that lost its lease wakes up, writes one more checkpoint and is refused; its
    clean-up must delete that object only, never the one the row names (which the new runner resumes from)."""
    args, open_store, storage = env

    async def scenario() -> None:
        store_a, store_b = open_store(), open_store()
        wake_a, wake_b, b_resumed = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def partitioned(*_args, **_kwargs):
            raise OSError("network partition")

        async def a_stalls(run: Run, step: int) -> None:
            if step == 2:  # after its checkpoint of step 2 was named
                store_a.heartbeat = partitioned
                await wake_a.wait()

        async def b_waits(run: Run, step: int) -> None:
            b_resumed.set()
            await wake_b.wait()

        a = Checkpointing(storage, steps=5, before_step=a_stalls)
        b = Checkpointing(storage, steps=5, before_step=b_waits)
        runner_a = checkpointing_runner(store_a, storage, args, "runner-a", a)
        submitted = await store_a.submit(app_id="a", input=INPUT, seed=1, rate_limited=False)
        request_id = submitted.request_id
        runner_a.loop.ensure_running()
        await wait_until(lambda: store_a.sync.get(request_id).checkpoint_step == 2)
        runner_b = checkpointing_runner(store_b, storage, args, "runner-b", b)
        runner_b.loop.ensure_running()  # claims the job once A's lease ran out, and resumes from A's checkpoint
        await asyncio.wait_for(b_resumed.wait(), 15)
        resumed_key = checkpoint_key(request_id, 1, 2)
        assert store_b.sync.get(request_id).epoch == 2 and b.resumed_from == [2]

        wake_a.set()  # A writes its checkpoint of step 3 under epoch 1, is refused, and cleans up
        await wait_until(lambda: not runner_a.runs, 10)
        row = store_b.sync.get(request_id)
        assert (row.checkpoint_step, row.epoch) == (2, 2)
        assert objects(storage, "checkpoints/") == [resumed_key]  # A's own object is gone, the named one is not
        assert storage.get_bytes(resumed_key) == Checkpointing.content(request_id, 1, 2)

        wake_b.set()
        job = await run_to_the_end(store_b, [runner_b], request_id)
        await runner_a.stop()
        assert job.error is None and job.epoch == 2
        assert objects(storage, "checkpoints/") == [checkpoint_key(request_id, 2, 4)]  # older ones pruned
        assert objects(storage) == job.result_keys == [result_key(request_id, 2)]
        assert attempts_of(store_b, request_id) == [(1, "lost", "lease_expired"), (2, "succeeded", None)]

    asyncio.run(scenario())



def fails_on_attempts(attempts: set[int], error: Callable[[], BaseException], at_step: int = 2) -> StepHook:
    """A ``before_step`` hook raising ``error()`` at ``at_step`` of the listed attempts."""
    async def hook(run: Run, step: int) -> None:
        if step == at_step and run.job.attempts in attempts:
            raise error()

    return hook


def test_an_infrastructure_fault_retries_the_job_from_its_checkpoint_and_records_every_attempt(env):
    args, open_store, storage = env

    async def scenario() -> None:
        store = open_store()
        pipeline = Checkpointing(storage, steps=4, before_step=fails_on_attempts(
            {1}, lambda: StorageError("S3 answered 503 SlowDown for bucket internal-bucket")))
        submitted = await store.submit(app_id="a", input=INPUT, seed=1, rate_limited=False)
        job = await run_to_the_end(store, [checkpointing_runner(store, storage, args, "runner-a", pipeline)],
                                   submitted.request_id)
        request_id = submitted.request_id
        assert job.error is None and job.attempts == 2
        assert pipeline.resumed_from == [None, 2]  # the second attempt resumed from the first one's checkpoint
        assert attempts_of(store, request_id) == [(1, "retried", "storage"), (2, "succeeded", None)]
        history = store.sync.attempts(request_id)
        assert history[0].runner == "runner-a" and history[0].error_message == "storage fault (StorageError)"
        log = log_of(store, request_id)
        assert "attempt 1 on runner-a failed (storage: storage fault (StorageError))" in log
        assert "resuming from the checkpoint after step 2" in log
        assert "internal-bucket" not in log  # the backend's own text stays in the server log
        assert objects(storage) == job.result_keys

    asyncio.run(scenario())


@pytest.mark.parametrize("error", [
    lambda: MediaError("audio_url: not an audio file", field="audio_url"),
    lambda: RuntimeError("a pipeline bug"),
], ids=["input-error", "pipeline-error"])
def test_input_and_pipeline_errors_fail_the_job_at_once(env, error):
    args, open_store, storage = env

    async def scenario() -> None:
        store = open_store()
        pipeline = Checkpointing(storage, steps=4, before_step=fails_on_attempts({1, 2, 3}, error))
        submitted = await store.submit(app_id="a", input=INPUT, seed=1, rate_limited=False)
        job = await run_to_the_end(store, [checkpointing_runner(store, storage, args, "runner-a", pipeline)],
                                   submitted.request_id)
        expected = 422 if isinstance(error(), MediaError) else 500
        assert job.error.status_code == expected and job.attempts == 1 and not job.dead_letter
        assert attempts_of(store, submitted.request_id) == [(1, "failed", job.error.error_type)]
        assert objects(storage) == []

    asyncio.run(scenario())


def test_a_job_out_of_attempts_is_a_dead_letter_with_its_history_and_an_operator_requeues_it(env):
    args, open_store, storage = env

    async def scenario() -> None:
        store = open_store()
        replica_died = lambda: ActorDiedError()  # noqa: E731 - a Denoiser replica's death, every attempt
        pipeline = Checkpointing(storage, steps=4, before_step=fails_on_attempts({1, 2, 3}, replica_died, 3))
        runner = checkpointing_runner(store, storage, args, "runner-a", pipeline)
        submitted = await store.submit(app_id="a", input=INPUT, seed=1, rate_limited=False)
        request_id = submitted.request_id
        job = await run_to_the_end(store, [runner], request_id)
        assert job.dead_letter and job.attempts == 3 and job.error.status_code == 503
        assert "gave up after 3 attempts" in job.error.message
        assert attempts_of(store, request_id) == [(e, "retried", "replica") for e in (1, 2, 3)]
        assert [dead.request_id for dead in await store.dead_letters()] == [request_id]
        assert job.checkpoint_step == 3  # kept for a re-queue

        await store.requeue(request_id)  # the operator's command, once the replicas are healthy again
        assert store.sync.get(request_id).started_at is None  # its deadline counts from its next start
        healthy = Checkpointing(storage, steps=4)
        job = await run_to_the_end(store, [checkpointing_runner(store, storage, args, "runner-b", healthy)],
                                   request_id)
        assert job.error is None and not job.dead_letter and healthy.resumed_from == [3]
        assert attempts_of(store, request_id)[-1] == (4, "succeeded", None)
        assert await store.dead_letters() == []

    asyncio.run(scenario())


def test_a_stalled_run_lets_go_of_its_lease_and_the_job_is_retried(env, tmp_path):
    """A run that makes no progress (a hung call without its own timeout) no longer renews its lease: it is
    stopped and retried instead of holding the job, its lease and a running slot of its key forever."""
    _, open_store, storage = env
    args = runner_args(tmp_path, timeouts={"unit_s": 0.2, "stall_s": 0.6})

    async def scenario() -> None:
        store = open_store()

        async def hangs_once(run: Run, step: int) -> None:
            if run.job.attempts == 1 and step == 1:
                await asyncio.Event().wait()  # never set

        pipeline = Checkpointing(storage, steps=3, before_step=hangs_once)
        submitted = await store.submit(app_id="a", input=INPUT, seed=1, rate_limited=False)
        job = await run_to_the_end(store, [checkpointing_runner(store, storage, args, "runner-a", pipeline)],
                                   submitted.request_id)
        assert job.error is None and job.attempts == 2
        assert attempts_of(store, submitted.request_id) == [(1, "retried", "stalled"), (2, "succeeded", None)]
        assert "no progress for 0.6 s (timeouts.stall_s)" in log_of(store, submitted.request_id)

    asyncio.run(scenario())


def test_a_job_past_its_deadline_fails_with_a_504(env, tmp_path):
    _, open_store, storage = env
    args = runner_args(tmp_path, timeouts={"job_s": 1.0})

    async def scenario() -> None:
        store = open_store()
        pipeline = Checkpointing(storage, steps=200, every=10, step_s=0.05)  # progresses, but needs 10 s
        submitted = await store.submit(app_id="a", input=INPUT, seed=1, rate_limited=False)
        started = time.monotonic()
        job = await run_to_the_end(store, [checkpointing_runner(store, storage, args, "runner-a", pipeline)],
                                   submitted.request_id)
        assert time.monotonic() - started < 8
        assert job.error.status_code == 504 and job.error.error_type == "request_timeout" and job.attempts == 1
        assert "timeouts.job_s" in job.error.message

    asyncio.run(scenario())


def test_fault_classes():
    wrapped = RayTaskError("prepare", "Traceback ...", StorageError("bucket gone")).as_instanceof_cause()
    assert [fault_class(e) for e in (
        LOCKED, StorageError("x"), wrapped, ActorDiedError(), ReplicaUnavailableError("r1"),
        UnitTimeoutError("u"), StageTimeoutError("s"), faults.RunStalledError("r"), TimeoutError(),
    )] == ["database", "storage", "storage", "replica", "replica", "timeout", "timeout", "stalled", "timeout"]
    assert [fault_class(e) for e in (
        StorageNotFoundError("gone"), MediaError("bad", field="image_url"), ValueError("bug"), KeyError("k"),
    )] == [None, None, None, None]


def test_each_model_claims_only_the_jobs_submitted_to_it(env):
    """Two applications on one database with different model fingerprints (an upgrade that changed the weights):
    each runs the jobs submitted to it, never the other's."""
    args, open_store, storage = env

    async def scenario() -> None:
        store = open_store()
        old, new = Pipeline(storage), Pipeline(storage)
        runners = [JobRunner(store, storage, args, "old-runner", old, model_fingerprint="weights-v1"),
                   JobRunner(open_store(), storage, args, "new-runner", new, model_fingerprint="weights-v2")]
        ids = {fp: [(await store.submit(app_id="a", input=INPUT, seed=i, rate_limited=False,
                                        model_fingerprint=fp)).request_id for i in range(2)]
               for fp in ("weights-v1", "weights-v2")}
        for runner in runners:
            runner.loop.ensure_running()
        everything = ids["weights-v1"] + ids["weights-v2"]
        await wait_until(lambda: all(store.sync.get(i).status == "COMPLETED" for i in everything), 30)
        for runner in runners:
            await runner.stop()
        for fp, runner in (("weights-v1", "old-runner"), ("weights-v2", "new-runner")):
            for request_id in ids[fp]:
                assert store.sync.get(request_id).error is None
                assert [a.runner for a in store.sync.attempts(request_id)] == [runner]

    asyncio.run(scenario())


def test_an_idle_runner_on_postgres_claims_a_new_job_at_once_though_it_polls_rarely(tmp_path, postgres):
    dsn_file = tmp_path / "dsn"
    dsn = postgres.create_database("runner")
    dsn_file.write_text(dsn)
    config = PostgresJobsConfig(dsn_file=dsn_file, pool_max_size=2)
    args = runner_args(tmp_path, dispatch={"poll_interval_s": 30.0})  # a poll would take up to 30 s
    storage = LocalStorage(args.storage)

    async def scenario() -> None:
        runner_store = make_job_store(config, tmp_path / "unused", args.job_limits())
        gateway = make_job_store(config, tmp_path / "unused", args.job_limits())
        try:
            runner = JobRunner(runner_store, storage, args, "runner-a", Pipeline(storage, steps=1))
            runner.loop.ensure_running()
            await asyncio.sleep(1.0)  # idle: waiting on the listener
            submitted_at = time.monotonic()
            submitted = await gateway.submit(app_id="a", input=INPUT, seed=1, rate_limited=False)
            await wait_until(lambda: gateway.sync.get(submitted.request_id).status != "IN_QUEUE", 10)
            assert time.monotonic() - submitted_at < 5.0  # woken by the NOTIFY, not by the 30 s poll
            await wait_until(lambda: gateway.sync.get(submitted.request_id).status == "COMPLETED", 20)
            await runner.stop()
        finally:
            for store in (runner_store, gateway):
                await asyncio.to_thread(store.close)

    try:
        asyncio.run(scenario())
    finally:
        postgres.drop_database(dsn)


def test_a_runs_log_lines_are_written_in_batches(env, tmp_path):
    _, open_store, storage = env
    args = runner_args(tmp_path, dispatch={"log_flush_s": 0.3})

    async def scenario() -> None:
        store = open_store()
        writes: list[int] = []
        real = store.log_batch

        async def counted(request_id, epoch, lines, **kwargs):
            writes.append(len(lines))
            return await real(request_id, epoch, lines, **kwargs)

        store.log_batch = counted
        submitted = await store.submit(app_id="a", input=INPUT, seed=1, rate_limited=False)
        job = await run_to_the_end(store, [JobRunner(store, storage, args, "runner-a",
                                                     Pipeline(storage, steps=30, step_s=0.02))],
                                   submitted.request_id)
        assert job.error is None
        lines = [line for line in log_of(store, submitted.request_id).splitlines() if line.startswith("step ")]
        assert lines == [f"step {i}" for i in range(1, 31)]  # every line, in order
        assert sum(writes) == 31 and len(writes) < 15  # 31 lines (the stage line too) in a few transactions

    asyncio.run(scenario())
