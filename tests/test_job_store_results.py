"""No result or checkpoint is lost to a race, on SQLite and PostgreSQL: a checkpoint is named only under the
caller's lease, each write has its own key and the one it replaces is handed back for pruning only once the new
one is named, and a runner whose ``complete`` lost its reply can ask whether it landed."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from deployments.jobstore import FencedError, JobError, LogEntry, SyncJobStore, cancelled_error
from tests.job_store_env import INPUT, Env, env_fixture, sql, submit  # noqa: F401


def checkpoint_column(store: SyncJobStore, job_id: str) -> tuple[str | None, int | None]:
    row = sql(store, "SELECT checkpoint_key, checkpoint_step FROM jobs WHERE request_id = ?", (job_id,))[0]
    return row["checkpoint_key"], row["checkpoint_step"]


def test_a_checkpoint_is_refused_once_the_job_finished_under_the_same_epoch(env: Env):
    """Finishing keeps the epoch: only the job's status tells a finished job from a running one."""
    store = env.open(max_attempts=1)
    # Leases long enough that the claims below cannot expire the first two on a slow database, short enough
    # to wait out.
    lease_s = 1.5
    cancelled = submit(store)
    job = store.claim("r", lease_s)
    store.cancel(cancelled, "k1")
    out_of_attempts = submit(store)
    lost = store.claim("r", lease_s)
    completed = submit(store)
    done = store.claim("r", 30)
    store.complete(completed, done.epoch, result={"video": "k"}, result_keys=["k"])
    sync = store.create_sync(app_id="a", input=INPUT, seed=1, runner_id="g", lease_s=lease_s, owner="k1",
                             rate_limited=False)
    time.sleep(lease_s + 0.1)
    assert store.expire_leases() == 3  # cancelled, dead-lettered and failed, each at the epoch its runner holds
    for job_id, epoch in ((cancelled, job.epoch), (out_of_attempts, lost.epoch), (completed, done.epoch),
                          (sync.request_id, sync.epoch)):
        assert store.get(job_id, "k1").epoch == epoch
        with pytest.raises(FencedError, match="checkpoint refused"):
            store.record_checkpoint(job_id, epoch, f"checkpoints/{job_id}/e{epoch}/s9.pt", 9)
        assert checkpoint_column(store, job_id) == (None, None)
    assert store.named_keys([f"checkpoints/{cancelled}/e1/s9.pt"]) == set()


def test_each_write_gets_its_own_key_and_the_replaced_one_is_prunable_once_the_new_one_is_named(env: Env):
    store = env.open()
    job_id = submit(store)
    first = store.claim("replica-a", 0.3)
    keys = [f"checkpoints/{job_id}/e1/s{step}.pt" for step in (2, 4)]
    assert store.record_checkpoint(job_id, first.epoch, keys[0], 2) is None
    assert store.record_checkpoint(job_id, first.epoch, keys[1], 4) == keys[0]
    assert store.named_keys(keys) == {keys[1]}  # the replaced key is no longer named: safe to delete
    assert store.record_checkpoint(job_id, first.epoch, keys[1], 4) is None  # the named key is never handed back
    time.sleep(0.4)
    second = store.claim("replica-b", 30)
    assert second.checkpoint_key == keys[1]
    stale = f"checkpoints/{job_id}/e1/s6.pt"  # the stalled first runner wrote one more: its own key
    with pytest.raises(FencedError):
        store.record_checkpoint(job_id, first.epoch, stale, 6)
    assert store.named_keys([stale, keys[1]]) == {keys[1]}  # deleting its own object leaves the named one alone
    newer = f"checkpoints/{job_id}/e2/s8.pt"
    assert store.record_checkpoint(job_id, second.epoch, newer, 8) == keys[1]
    assert checkpoint_column(store, job_id) == (newer, 8)
    with pytest.raises(ValueError, match="step >= 0"):
        store.record_checkpoint(job_id, second.epoch, newer, -1)


@contextmanager
def commit_reply_lost(store: SyncJobStore) -> Iterator[type[Exception]]:
    """The next write transaction commits in the database, then its caller gets the driver error a connection
    lost between COMMIT and its reply raises."""
    import psycopg

    error = sqlite3.OperationalError if store.backend.name == "sqlite" else psycopg.OperationalError
    real = store.backend.write

    @contextmanager
    def write() -> Iterator:
        with real() as cur:
            yield cur
        raise error("server closed the connection unexpectedly")

    store.backend.write = write  # type: ignore[method-assign]
    try:
        yield error
    finally:
        del store.backend.write


def test_after_a_lost_commit_reply_the_runner_learns_whether_its_completion_landed(env: Env):
    store = env.open()
    landed = submit(store)
    job = store.claim("r", 30)
    key = f"results/{landed}/e1/output.mp4"
    with commit_reply_lost(store) as error, pytest.raises(error):
        store.complete(landed, job.epoch, result={"video": key}, result_keys=[key])
    view = store.completion(landed, job.epoch)
    assert view is not None and (view.outcome, view.result_keys) == ("succeeded", [key])  # keep the object
    assert store.named_keys([key]) == {key}

    running = submit(store)
    job = store.claim("r", 0.3)
    assert store.completion(running, job.epoch) is None  # nothing committed: the job is still ours to complete
    failed = store.complete(running, job.epoch, error=JobError(status_code=500, detail="boom", message="boom"))
    assert store.completion(running, job.epoch) == failed

    reclaimed = submit(store)
    old = store.claim("r", 0.2)
    time.sleep(0.3)
    new = store.claim("r2", 30)
    store.complete(reclaimed, new.epoch, result={"video": "theirs"}, result_keys=["theirs"])
    assert store.completion(reclaimed, old.epoch) is None  # another runner's completion: ours is not named
    assert store.completion(reclaimed, new.epoch).result_keys == ["theirs"]

    expired = submit(store)
    job = store.claim("r", 0.2)
    store.cancel(expired, "k1")
    time.sleep(0.3)
    store.expire_leases()  # finished by the store at the runner's own epoch: not the runner's completion
    assert store.get(expired, "k1").epoch == job.epoch and store.completion(expired, job.epoch) is None
    assert store.completion("0" * 32, 1) is None

    cancelled = submit(store)
    job = store.claim("r", 30)
    store.complete(cancelled, job.epoch, error=cancelled_error())
    assert store.completion(cancelled, job.epoch).outcome == "cancelled"


def test_a_batch_of_log_lines_is_one_fenced_write_numbered_in_order_and_bounded(env: Env):
    store = env.open(max_log_lines=6)
    job_id = submit(store)
    job = store.claim("r", 30)
    lines = [LogEntry(message=f"step {i}", level="WARN" if i == 2 else "INFO", source="PIPELINE") for i in range(5)]
    assert store.log_batch(job_id, job.epoch, lines, stage="denoising", progress=0.4, lease_s=60) is False
    page = store.logs(job_id, "k1")
    assert [(line.line, line.message) for line in page.lines][-5:] == [(3 + i, f"step {i}") for i in range(5)]
    assert [line.level for line in page.lines][-3] == "WARN" and page.lines[-1].source == "PIPELINE"
    view = store.get(job_id, "k1")
    assert (view.stage, view.progress, view.log_count) == ("denoising", 0.4, 7)
    assert view.lease_expires_at - job.lease_expires_at > 20
    store.log_batch(job_id, job.epoch, lines[:3])
    assert [line.line for line in store.logs(job_id, "k1").lines] == [5, 6, 7, 8, 9, 10]  # the bound holds
    store.cancel(job_id, "k1")
    assert store.log_batch(job_id, job.epoch, []) is True  # no lines: a progress write that sees the cancel
    store.complete(job_id, job.epoch, error=cancelled_error())
    written = store.get(job_id, "k1").log_count
    with pytest.raises(FencedError):
        store.log_batch(job_id, job.epoch, lines)
    assert store.get(job_id, "k1").log_count == written  # the refused batch wrote nothing
    assert store.logs(job_id, "k1").lines[-1].message == "cancelled"
    with pytest.raises(ValueError, match="at most"):
        store.log_batch(job_id, job.epoch, lines * 201)
