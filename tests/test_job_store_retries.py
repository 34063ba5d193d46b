"""Attempts, retries and dead letters in the job store, on SQLite and PostgreSQL: an infrastructure fault lets go
of a job (queued again after a backoff, resumed from its checkpoint by another runner) up to ``max_attempts``,
every claim is recorded (where, when, how it ended), and a job out of attempts is a dead letter an operator can
list and re-queue."""

from __future__ import annotations

import time

import pytest

from deployments.jobstore import FencedError, JobError, NotDeadLetteredError
from tests.job_store_env import Env, env_fixture, log_messages, sql, submit  # noqa: F401

DB_DOWN = JobError(status_code=503, detail="the jobs database is unavailable", error_type="service_unavailable",
                   message="database is locked")
STORAGE_DOWN = JobError(status_code=503, detail="storage is unavailable", error_type="service_unavailable",
                        message="S3 timed out")


def test_a_retried_job_waits_its_backoff_then_resumes_elsewhere_and_the_old_runner_is_fenced(env: Env):
    store = env.open(max_attempts=3)
    job_id = submit(store)
    first = store.claim("replica-a", 30)
    store.record_checkpoint(job_id, first.epoch, f"checkpoints/{job_id}/e1/s4.pt", 4)
    view = store.retry(job_id, first.epoch, error=DB_DOWN, error_class="database", backoff_s=0.8)
    assert (view.status, view.stage, view.attempts, view.lease_owner) == ("IN_QUEUE", "queued", 1, None)
    assert view.not_before is not None and view.not_before - view.created_at >= 0.8
    assert store.claim("replica-b", 30) is None  # still backing off
    with pytest.raises(FencedError):
        store.heartbeat(job_id, first.epoch, 30)
    time.sleep(0.9)
    second = store.claim("replica-b", 30)
    assert (second.request_id, second.epoch, second.attempts) == (job_id, 2, 2)
    assert (second.checkpoint_key, second.checkpoint_step) == (f"checkpoints/{job_id}/e1/s4.pt", 4)
    with pytest.raises(FencedError):  # a late retry of the first runner changes nothing
        store.retry(job_id, first.epoch, error=DB_DOWN, error_class="database")
    store.complete(job_id, second.epoch, result={"video": "k"}, result_keys=["k"])

    history = store.attempts(job_id, "k1")
    assert [(a.attempt, a.epoch, a.runner, a.outcome, a.error_class, a.error_message) for a in history] == [
        (1, 1, "replica-a", "retried", "database", "database is locked"),
        (2, 2, "replica-b", "succeeded", None, None)]
    assert all(a.ended_at is not None and a.ended_at >= a.started_at for a in history)
    assert history[1].started_at >= history[0].ended_at + 0.8  # the backoff separates them
    assert "attempt 1 on replica-a failed (database: database is locked); queued again in 0.8 s, it resumes from " \
           "its last checkpoint" in log_messages(store, job_id)
    assert store.attempts(job_id, "k2") is None  # another owner's job does not exist


def test_a_job_out_of_attempts_is_a_dead_letter_with_its_history_and_can_be_requeued(env: Env):
    store = env.open(max_attempts=2)
    job_id = submit(store, webhook_url="https://hooks.example.invalid/d")
    failed_normally = submit(store)
    first = store.claim("replica-a", 30)
    store.retry(job_id, first.epoch, error=STORAGE_DOWN, error_class="storage", backoff_s=0)
    second = store.claim("replica-b", 30)
    assert second.request_id == job_id  # back in its old place, ahead of the later job
    view = store.retry(job_id, second.epoch, error=DB_DOWN, error_class="database", backoff_s=5)
    other = store.claim("replica-a", 30)
    store.complete(failed_normally, other.epoch, error=JobError(status_code=422, detail="bad", message="bad"))

    assert (view.status, view.outcome, view.dead_letter, view.attempts) == ("COMPLETED", "failed", True, 2)
    assert view.error == JobError(status_code=503, detail="the jobs database is unavailable",
                                  error_type="service_unavailable",
                                  message="database is locked (gave up after 2 attempts)")
    assert [j.request_id for j in store.dead_letters()] == [job_id]  # a job that failed on its own is not one
    snapshot = store.status(job_id, "k1", with_attempts=True)
    assert [(a.runner, a.outcome, a.error_class) for a in snapshot.attempts] == [
        ("replica-a", "retried", "storage"), ("replica-b", "retried", "database")]
    assert store.status(job_id, "k1").attempts is None  # a plain poll does not read the history
    assert store.webhook_state(job_id)["state"] == "pending"  # the failure is reported

    with pytest.raises(NotDeadLetteredError):
        store.requeue(failed_normally)
    requeued = store.requeue(job_id)
    assert (requeued.status, requeued.attempts, requeued.dead_letter, requeued.error) == ("IN_QUEUE", 0, False, None)
    assert store.webhook_state(job_id) is None and store.dead_letters() == []
    third = store.claim("replica-c", 30)
    assert (third.request_id, third.epoch, third.attempts) == (job_id, 3, 1)
    done = store.complete(job_id, third.epoch, result={"video": "k"}, result_keys=["k"])
    assert done.outcome == "succeeded" and not done.dead_letter
    assert store.webhook_state(job_id)["state"] == "pending"  # the final outcome is owed again
    assert [a.outcome for a in store.attempts(job_id, "k1")] == ["retried", "retried", "succeeded"]
    assert "re-queued by an operator after running out of attempts" in log_messages(store, job_id)
    with pytest.raises(NotDeadLetteredError):
        store.requeue(job_id)


def test_a_lease_that_runs_out_is_a_lost_attempt_and_the_last_one_a_dead_letter(env: Env):
    store = env.open(max_attempts=2)
    job_id = submit(store)
    store.claim("replica-a", 0.2)
    time.sleep(0.3)
    again = store.claim("replica-b", 0.2)
    assert again.attempts == 2
    time.sleep(0.3)
    assert store.expire_leases() == 1
    view = store.get(job_id, "k1")
    assert (view.outcome, view.dead_letter, view.error.error_type) == ("failed", True, "runner_disconnected")
    assert [(a.runner, a.outcome, a.error_class) for a in store.attempts(job_id, "k1")] == [
        ("replica-a", "lost", "lease_expired"), ("replica-b", "lost", "lease_expired")]
    assert [j.request_id for j in store.dead_letters()] == [job_id]


def test_retry_fails_a_sync_job_and_cancels_a_cancel_requested_one(env: Env):
    store = env.open()
    sync = store.create_sync(app_id="a", input={"prompt": "x"}, seed=1, runner_id="gateway-1", lease_s=30,
                             owner="k1", rate_limited=False)
    view = store.retry(sync.request_id, sync.epoch, error=DB_DOWN, error_class="database", backoff_s=1)
    assert (view.status, view.outcome, view.error.message, view.dead_letter) == (
        "COMPLETED", "failed", "database is locked", False)  # its caller waits on this attempt: never re-queued
    job_id = submit(store)
    job = store.claim("r", 30)
    store.cancel(job_id, "k1")
    assert store.retry(job_id, job.epoch, error=DB_DOWN, error_class="database").outcome == "cancelled"
    assert [a.outcome for a in store.attempts(sync.request_id, "k1")] == ["retried"]
    assert store.dead_letters() == []
    with pytest.raises(ValueError, match="error_class"):
        store.retry(job_id, job.epoch, error=DB_DOWN, error_class="Database Error")
    with pytest.raises(ValueError, match="backoff_s"):
        store.retry(job_id, job.epoch, error=DB_DOWN, error_class="database", backoff_s=-1)


def test_attempt_history_is_bounded_per_job_and_swept_with_the_job(env: Env):
    store = env.open(max_attempt_history=3, max_attempts=1)
    job_id = submit(store)
    for _ in range(5):  # releases at shutdown refund the attempt: the history can outgrow max_attempts
        job = store.claim("r", 30)
        store.release(job_id, job.epoch, "the replica is shutting down")
    job = store.claim("r", 30)
    store.complete(job_id, job.epoch, result={"video": "k"}, result_keys=["k"])
    assert [(a.epoch, a.outcome) for a in store.attempts(job_id, "k1")] == [
        (4, "released"), (5, "released"), (6, "succeeded")]
    time.sleep(0.2)
    assert [i.request_id for i in store.expired("jobs", 0.1)] == [job_id]
    assert store.purge("jobs", [job_id], 0.1) == 1
    assert sql(store, "SELECT count(*) AS n FROM job_attempts")[0]["n"] == 0


def test_requeue_refuses_a_dead_letter_whose_inputs_retention_deleted(env: Env):
    store = env.open(max_attempts=1)
    job_id = submit(store, input_keys=("inputs/k1/x/face.png",))
    job = store.claim("r", 30)
    store.retry(job_id, job.epoch, error=DB_DOWN, error_class="database")
    time.sleep(0.2)
    assert store.purge("inputs", [job_id], 0.1) == 1
    with pytest.raises(NotDeadLetteredError, match="deleted by retention"):
        store.requeue(job_id)
    assert store.get(job_id, "k1").dead_letter
