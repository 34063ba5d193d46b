"""The runner inside every Orchestrator replica, without Ray: a real SQLite jobs database, real local storage,
and a stand-in for the pipeline that writes objects the way the Orchestrator does (object first, then the row).

What must hold: a cancel request or a lost lease never cuts an object write short (no orphan object); a runner
that lost its lease deletes what it wrote and the winner's result is the only one; a replica that shuts down hands
its queued jobs back; a sync caller that leaves ends its job cancelled.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from deployments.config import AppArgs
from deployments.contracts import JobCancelled, StoredResult, StoredVideo
from deployments.jobstore import FencedError, JobStore, SqliteJobsConfig, make_job_store
from deployments.orchestrator.runner import JobRunner, Run, RunReporter
from deployments.storage import LocalStorage, LocalStorageConfig
from deployments.storage.keys import result_key

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


@pytest.fixture
def env(tmp_path: Path):
    args = AppArgs(storage=LocalStorageConfig(root=tmp_path / "data"), max_running_jobs=1,
                   dispatch={"lease_s": 1.0, "heartbeat_s": 0.2, "poll_interval_s": 0.05, "webhook_lease_s": 20})
    stores: list[JobStore] = []

    def open_store() -> JobStore:
        store = make_job_store(SqliteJobsConfig(synchronous="NORMAL"), tmp_path / "jobs.sqlite3", args.job_limits())
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
        release_a.set()  # A wakes up, writes its result under epoch 1, and its completion is refused
        await wait_until(lambda: not runner_a.runs, 10)
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
        assert time.monotonic() - started < 1.0  # seen at the next step report (or heartbeat)
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
