"""The job store against real databases: every test runs on SQLite (a file) and on PostgreSQL (a throw-away
cluster from Debian's package, a fresh database per test). Short leases (tenths of a second) stand in for the
real ones; the database's clock decides when they expire, so the tests sleep past them."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from deployments.jobstore import (
    DEFAULT_DSN_ENV,
    FencedError,
    JobError,
    JobLimits,
    JobsConfig,
    KeyQueueCapError,
    KeyRunningCapError,
    MigrationError,
    PostgresJobsConfig,
    QueueFullError,
    RateLimitedError,
    SqliteJobsConfig,
    SyncJobStore,
    cancelled_error,
    make_job_store,
    make_sync_job_store,
    new_request_id,
)
from deployments.jobstore.schema import MIGRATIONS
from testing.postgres import Postgres
from tests.job_store_env import INPUT, Env, env_fixture, log_messages, sql, submit, together  # noqa: F401


# -- queue discipline -----------------------------------------------------------------------------------------------
def test_claims_follow_priority_then_submission_order(env: Env):
    store = env.open()
    order = ["normal", "low", "normal", "low", "normal"]
    ids = [submit(store, priority=p) for p in order]
    claimed = [store.claim("r1", 30).request_id for _ in ids]
    assert claimed == [ids[0], ids[2], ids[4], ids[1], ids[3]]
    assert store.claim("r1", 30) is None


def test_queue_position_counts_jobs_ahead_in_dispatch_order(env: Env):
    store = env.open()
    low = store.submit(app_id="a", input=INPUT, seed=1, owner="k1", priority="low", rate_limited=False)
    n1 = store.submit(app_id="a", input=INPUT, seed=1, owner="k1", rate_limited=False)
    n2 = store.submit(app_id="a", input=INPUT, seed=1, owner="k2", rate_limited=False)
    assert (low.queue_position, n1.queue_position, n2.queue_position) == (0, 0, 1)
    # the two normal jobs went ahead of the earlier low one
    assert [store.position(i) for i in (n1.request_id, n2.request_id, low.request_id)] == [0, 1, 2]
    low2 = store.submit(app_id="a", input=INPUT, seed=1, owner="k2", priority="low", rate_limited=False)
    n3 = store.submit(app_id="a", input=INPUT, seed=1, owner="k2", rate_limited=False)
    assert (low2.queue_position, n3.queue_position) == (3, 2)
    assert [store.position(i) for i in (low2.request_id, n3.request_id, low.request_id)] == [4, 2, 3]
    store.cancel(low2.request_id, "k2")
    store.cancel(n3.request_id, "k2")
    snapshot = store.status(low.request_id, "k1")
    assert snapshot is not None and snapshot.position == 2 and snapshot.job.status == "IN_QUEUE"
    store.claim("r1", 30)
    assert [store.position(i) for i in (n1.request_id, n2.request_id, low.request_id)] == [0, 0, 1]
    assert store.queue_length() == 2 and store.running_count() == 1
    assert store.position("0" * 32) is None


def test_queue_caps_raise_distinct_errors_and_leave_no_row(env: Env):
    store = env.open(max_queue_length=4, max_queued_per_owner=2, rate_burst=10, rate_per_s=0.001)
    submit(store, "k1", rate_limited=True)
    submit(store, "k1", rate_limited=True)
    with pytest.raises(KeyQueueCapError, match="already has 2 queued jobs"):
        submit(store, "k1", rate_limited=True)
    submit(store, "k2")
    with pytest.raises(QueueFullError, match=r"holds 3 jobs \(limit 3\)"):  # the caller's fal_max_queue_length
        submit(store, "k3", max_queue_length=3)
    submit(store, "k3")
    with pytest.raises(QueueFullError, match=r"holds 4 jobs \(limit 4\)"):  # the server's limit
        submit(store, "k4")
    with pytest.raises(ValueError, match="must hold references"):  # a data: URI belongs in storage, not the row
        store.submit(app_id="a", input={**INPUT, "image_url": "data:image/png;base64," + "A" * 100_000}, seed=1,
                     owner="k5")
    assert store.queue_length() == 4
    assert sql(store, "SELECT count(*) AS n FROM jobs")[0]["n"] == 4
    # refused submits spent no token: k1 took 2 of its 10
    assert sql(store, "SELECT tokens FROM rate_buckets WHERE owner = ?", ("k1",))[0]["tokens"] == pytest.approx(8, abs=0.1)
    # a claimed job frees a queue place
    store.claim("r", 30)
    submit(store, "k4")


def test_queue_cap_and_rate_limit_hold_under_concurrent_requests(env: Env):
    stores = [env.open(max_queue_length=5, rate_burst=4, rate_per_s=0.001) for _ in range(2)]
    results = together(10, lambda i: submit(stores[i % 2], f"k{i}"))
    assert sum(isinstance(r, str) for r in results) == 5
    assert sum(isinstance(r, QueueFullError) for r in results) == 5
    assert stores[0].queue_length() == 5
    waits = together(10, lambda i: stores[i % 2].take_token("k-shared"))
    assert sorted(w == 0.0 for w in waits) == [False] * 6 + [True] * 4


def test_rate_limit_is_shared_by_two_store_instances(env: Env):
    a = env.open(rate_per_s=0.5, rate_burst=3)
    b = env.open(rate_per_s=0.5, rate_burst=3)
    submit(a, "k1", rate_limited=True)
    submit(b, "k1", rate_limited=True)
    assert a.take_token("k1") == 0.0  # the third of the burst, taken through the other instance
    with pytest.raises(RateLimitedError) as refused:
        submit(b, "k1", rate_limited=True)
    assert 1.0 < refused.value.retry_after_s <= 2.0  # one token at 0.5/s
    assert a.take_token("k1") > 1.0
    assert submit(a, "k2", rate_limited=True)  # another key has its own bucket
    assert a.queue_length() == 3  # the refused submit left nothing behind
    # idle buckets are full again and can be dropped: k2's is 6 s from full, none is pruned yet
    assert a.prune_rate_buckets() == 0


# -- cancel and isolation ---------------------------------------------------------------------------------------------
def test_cancel_queued_running_and_finished_jobs(env: Env):
    store = env.open()
    queued, running, done = submit(store), submit(store), submit(store)
    assert store.claim("r", 30).request_id == queued  # queued is first: take all three, then release queued
    job_running = store.claim("r", 30)
    job_done = store.claim("r", 30)
    store.release(queued, 1, "test: give it back")
    store.complete(done, job_done.epoch, result={"video": "k"}, result_keys=["k"])

    assert store.cancel(queued, "k1") == "CANCELLATION_REQUESTED"
    view = store.get(queued, "k1")
    assert (view.status, view.outcome, view.stage) == ("COMPLETED", "cancelled", "cancelled")
    assert view.error is not None and (view.error.status_code, view.error.error_type) == (499, "client_cancelled")
    assert store.claim("r", 30) is None  # a cancelled job is never dispatched

    assert store.cancel(running, "k1") == "CANCELLATION_REQUESTED"
    assert store.get(running, "k1").status == "IN_PROGRESS"
    assert store.heartbeat(running, job_running.epoch, 30) is True  # the runner sees the flag
    assert store.report(running, job_running.epoch, progress=0.5) is True
    final = store.complete(running, job_running.epoch, error=cancelled_error())
    assert final.outcome == "cancelled"

    assert store.cancel(done, "k1") == "ALREADY_COMPLETED"
    assert store.cancel("f" * 32, "k1") == "NOT_FOUND"
    assert "cancellation requested" in log_messages(store, running)


def test_cancel_requested_job_whose_runner_died_ends_cancelled(env: Env):
    store = env.open()
    job_id = submit(store)
    store.claim("r", 0.2)
    store.cancel(job_id, "k1")
    time.sleep(0.35)
    assert store.expire_leases() == 1
    view = store.get(job_id, "k1")
    assert (view.status, view.outcome) == ("COMPLETED", "cancelled")


def test_another_owner_sees_nothing_and_cannot_cancel(env: Env):
    store = env.open()
    job_id = submit(store, "k1")
    assert store.get(job_id, "k2") is None
    assert store.status(job_id, "k2") is None
    assert store.logs(job_id, "k2") is None
    assert store.position(job_id, owner="k2") is None
    assert store.cancel(job_id, "k2") == "NOT_FOUND"
    view = store.get(job_id, "k1")
    assert view.status == "IN_QUEUE" and not view.cancel_requested
    assert store.position(job_id, owner="k1") == 0


# -- leases and fencing -----------------------------------------------------------------------------------------------
def test_claim_takes_a_lease_that_heartbeats_renew(env: Env):
    store = env.open()
    job_id = submit(store)
    job = store.claim("runner-a", 5)
    assert (job.request_id, job.epoch, job.attempts, job.lease_owner) == (job_id, 1, 1, "runner-a")
    assert job.input == INPUT and job.seed == 7 and job.checkpoint_key is None
    assert job.lease_expires_at - job.started_at == pytest.approx(5, abs=0.5)
    assert store.heartbeat(job_id, 1, 60) is False
    with pytest.raises(ValueError, match="lease_s"):
        store.heartbeat(job_id, 1, 0)
    view = store.get(job_id, "k1")
    assert view.lease_expires_at - job.lease_expires_at == pytest.approx(55, abs=1)
    assert store.report(job_id, 1, stage="denoising", progress=1.7, message="step 1/2") is False
    view = store.get(job_id, "k1")
    assert (view.stage, view.progress, view.status, view.lease_owner) == ("denoising", 1.0, "IN_PROGRESS", "runner-a")
    assert log_messages(store, job_id)[-2:] == ["started", "step 1/2"]
    assert store.running_count() == 1 and store.running_count("k1") == 1 and store.running_count("k2") == 0


def test_expired_lease_is_reclaimed_with_a_new_epoch_and_the_old_runner_is_fenced(env: Env):
    store = env.open()
    job_id = submit(store)
    old = store.claim("runner-a", 0.3)
    assert store.record_checkpoint(job_id, old.epoch, f"checkpoints/{job_id}/e1/latents.pt", 3) is None
    time.sleep(0.45)
    new = store.claim("runner-b", 30)
    assert (new.request_id, new.epoch, new.attempts, new.lease_owner) == (job_id, 2, 2, "runner-b")
    assert (new.checkpoint_key, new.checkpoint_step) == (f"checkpoints/{job_id}/e1/latents.pt", 3)
    lines_before = store.get(job_id, "k1").log_count

    fenced = [
        lambda: store.heartbeat(job_id, old.epoch, 30),
        lambda: store.report(job_id, old.epoch, stage="stale", progress=0.9),
        lambda: store.log(job_id, old.epoch, "stale line"),
        lambda: store.record_checkpoint(job_id, old.epoch, f"checkpoints/{job_id}/e1/latents-9.pt", 9),
        lambda: store.complete(job_id, old.epoch, result={"video": "stale"}, result_keys=["stale"]),
        lambda: store.complete(job_id, old.epoch, error=cancelled_error()),
        lambda: store.release(job_id, old.epoch, "stale release"),
    ]
    for write in fenced:
        with pytest.raises(FencedError):
            write()
    view = store.get(job_id, "k1")
    assert (view.status, view.epoch, view.lease_owner, view.stage) == ("IN_PROGRESS", 2, "runner-b", "starting")
    assert view.log_count == lines_before and "stale line" not in log_messages(store, job_id)
    assert sql(store, "SELECT checkpoint_step FROM jobs WHERE request_id = ?", (job_id,))[0]["checkpoint_step"] == 3

    # the new holder checkpoints under its own epoch (told to delete the old object) and completes once
    assert store.record_checkpoint(job_id, 2, f"checkpoints/{job_id}/e2/latents.pt", 5) == \
        f"checkpoints/{job_id}/e1/latents.pt"
    done = store.complete(job_id, 2, result={"video": f"results/{job_id}/e2/output.mp4"},
                          result_keys=[f"results/{job_id}/e2/output.mp4"])
    assert (done.outcome, done.attempts, done.result_keys) == ("succeeded", 2, [f"results/{job_id}/e2/output.mp4"])
    with pytest.raises(FencedError):
        store.complete(job_id, 2, result={"video": "again"})
    messages = log_messages(store, job_id)
    assert any("stopped renewing its lease (attempt 1); queued again" in m for m in messages)
    assert "started again (attempt 2); resuming from the checkpoint after step 3" in messages


def test_simultaneous_claims_never_hand_one_job_to_two_runners(env: Env):
    stores = [env.open(), env.open()]
    ids = {submit(stores[0]) for _ in range(6)}
    barrier = threading.Barrier(8)
    got: list[Any] = []

    def claim(i: int) -> None:
        barrier.wait()
        got.append(stores[i % 2].claim(f"r{i}", 30))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    jobs = [j for j in got if j is not None]
    assert len(jobs) == 6 and {j.request_id for j in jobs} == ids and {j.epoch for j in jobs} == {1}
    assert len({j.lease_owner for j in jobs}) == 6


def test_release_requeues_in_place_and_refunds_the_attempt(env: Env):
    store = env.open(max_attempts=1)
    first, second = submit(store), submit(store)
    job = store.claim("r", 30)
    view = store.release(first, job.epoch, "the runner is shutting down")
    assert (view.status, view.attempts, view.stage) == ("IN_QUEUE", 0, "queued")
    assert store.position(first) == 0 and store.position(second) == 1  # back in its old place
    again = store.claim("r2", 30)
    assert (again.request_id, again.epoch, again.attempts) == (first, 2, 1)


def _race_worker(kind: str, location: str, app: str, threads: int, lease_s: float, budget_s: float) -> list[tuple]:
    """One "application": its own store instance and ``threads`` runners claiming until the queue is drained.
    Jobs whose id ends in 0-2 are abandoned on their first claim (a crash: the lease expires); ids ending in 3
    make the first runner stall past its lease before completing (a stale writer)."""
    if kind == "sqlite":
        config: Any = SqliteJobsConfig(path=Path(location), synchronous="NORMAL")
    else:
        os.environ[DEFAULT_DSN_ENV] = location
        config = PostgresJobsConfig(pool_max_size=threads)
    store = make_sync_job_store(config, Path(location), JobLimits(max_attempts=20))
    events: list[tuple] = []
    deadline = time.monotonic() + budget_s

    def run(runner: str) -> None:
        while time.monotonic() < deadline:
            job = store.claim(runner, lease_s)
            if job is None:
                if store.queue_length() == 0 and store.running_count() == 0:
                    return
                time.sleep(0.02)
                continue
            events.append(("claim", job.request_id, job.epoch, runner))
            tail = int(job.request_id[-1], 16) % 8
            if job.epoch == 1 and tail < 3:
                continue  # crashed
            try:
                store.heartbeat(job.request_id, job.epoch, lease_s)
                if job.epoch == 1 and tail == 3:
                    time.sleep(lease_s * 1.6)  # stalls; another runner may take the job meanwhile
                key = f"results/{job.request_id}/e{job.epoch}/output.mp4"
                store.complete(job.request_id, job.epoch, result={"runner": runner, "epoch": job.epoch},
                               result_keys=[key])
                events.append(("complete", job.request_id, job.epoch, runner))
            except FencedError:
                events.append(("fenced", job.request_id, job.epoch, runner))

    workers = [threading.Thread(target=run, args=(f"{app}-{i}",)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    store.close()
    return events


def test_two_applications_racing_claim_each_job_once_and_complete_it_once(env: Env):
    store = env.open()
    ids = [submit(store, f"k{i % 3}") for i in range(40)]
    lease_s, budget_s = 1.0, 40.0
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = [pool.apply_async(_race_worker, (env.kind, env.location(), app, 3, lease_s, budget_s))
                   for app in ("app-a", "app-b")]
        events = [e for r in results for e in r.get(timeout=budget_s + 30)]

    claims = [(rid, epoch) for kind, rid, epoch, _ in events if kind == "claim"]
    assert len(claims) == len(set(claims)), "an epoch of a job was handed to two runners"
    completes = Counter(rid for kind, rid, _, _ in events if kind == "complete")
    assert set(completes) == set(ids) and set(completes.values()) == {1}, "a job completed twice or never"
    epochs: dict[str, list[int]] = defaultdict(list)
    for rid, epoch in claims:
        epochs[rid].append(epoch)
    for rid in ids:
        view = store.get(rid, f"k{ids.index(rid) % 3}")
        won = next(e for e in events if e[0] == "complete" and e[1] == rid)
        assert (view.status, view.outcome) == ("COMPLETED", "succeeded")
        assert view.result == {"runner": won[3], "epoch": won[2]}  # the winner's result, never overwritten
        assert view.result_keys == [f"results/{rid}/e{won[2]}/output.mp4"]
        assert sorted(epochs[rid]) == list(range(1, view.epoch + 1)) and view.attempts == view.epoch
        tail = int(rid[-1], 16) % 8
        history = [e for e in events if e[1] == rid]
        if tail < 3:
            assert view.epoch == 2, history  # abandoned on its first claim, finished by the one reclaim
        elif tail > 3 and view.epoch > 1:  # only when its first runner stalled past its lease (a loaded machine)
            assert ("fenced", rid, 1) in [e[:3] for e in history], history
    for kind, rid, epoch, _ in events:
        if kind == "fenced":
            assert epoch < store.get(rid, f"k{ids.index(rid) % 3}").epoch
    assert {e[3].split("-")[0] + "-" + e[3].split("-")[1] for e in events if e[0] == "claim"} == {"app-a", "app-b"}


# -- sync requests, caps on running jobs, attempts, deadlines -----------------------------------------------------------
def test_sync_jobs_count_as_running_and_fail_when_their_lease_expires(env: Env):
    store = env.open(max_running_per_owner=1)
    sync = store.create_sync(app_id="a", input=INPUT, seed=3, runner_id="gateway-1", lease_s=60, owner="k1",
                             rate_limited=False)
    assert (sync.kind, sync.epoch, sync.attempts) == ("sync", 1, 1)
    assert store.running_count("k1") == 1
    with pytest.raises(KeyRunningCapError, match="already has 1 running jobs"):
        store.create_sync(app_id="a", input=INPUT, seed=3, runner_id="gateway-1", lease_s=30, owner="k1",
                          rate_limited=False)
    mine, theirs = submit(store, "k1"), submit(store, "k2")
    assert store.claim("r", 30).request_id == theirs  # k1 is at its running cap: its queued job waits
    assert store.claim("r", 30) is None
    store.heartbeat(sync.request_id, sync.epoch, 0.05)  # the gateway's last renewal: then it dies
    time.sleep(0.2)
    claimed = store.claim("r", 30)  # the sync lease expired: failed, which frees k1's place
    assert claimed.request_id == mine
    view = store.get(sync.request_id, "k1")
    assert (view.status, view.outcome) == ("COMPLETED", "failed")
    assert view.error.error_type == "runner_disconnected" and view.attempts == 1
    assert "sync request" in view.error.message


def test_running_cap_holds_under_concurrent_claims_and_sync_requests(env: Env):
    stores = [env.open(max_running_per_owner=2) for _ in range(2)]
    for _ in range(4):
        submit(stores[0], "k1")

    def start(i: int) -> Any:
        store = stores[i % 2]
        if i < 4:
            return store.claim(f"r{i}", 30)
        return store.create_sync(app_id="a", input=INPUT, seed=1, runner_id=f"g{i}", lease_s=30, owner="k1",
                                 rate_limited=False)

    def sync(i: int) -> Any:
        return stores[i % 2].create_sync(app_id="a", input=INPUT, seed=1, runner_id=f"g{i}", lease_s=30,
                                         owner="k1", rate_limited=False)

    for attempt, fn in (("sync only", sync), ("claims and sync", start)):
        results = together(8, fn)
        started = [r for r in results if r is not None and not isinstance(r, Exception)]
        assert len(started) == 2 and stores[0].running_count("k1") == 2, attempt
        assert all(r is None or isinstance(r, KeyRunningCapError) for r in results if r not in started), attempt
        for job in started:
            stores[0].complete(job.request_id, job.epoch, error=cancelled_error())


def test_max_running_total_counts_every_running_job(env: Env):
    store = env.open()
    for _ in range(3):
        submit(store)
    assert store.claim("r", 30, max_running_total=2) is not None
    store.create_sync(app_id="a", input=INPUT, seed=1, runner_id="g", lease_s=30, owner="k9", rate_limited=False)
    assert store.claim("r", 30, max_running_total=2) is None
    assert store.claim("r", 30, max_running_total=3) is not None


def test_a_job_out_of_attempts_is_failed_instead_of_claimed(env: Env):
    store = env.open(max_attempts=2)
    job_id = submit(store)
    assert store.claim("r1", 0.2).attempts == 1
    time.sleep(0.3)
    assert store.claim("r2", 0.2).attempts == 2
    time.sleep(0.3)
    assert store.claim("r3", 30) is None
    view = store.get(job_id, "k1")
    assert (view.status, view.outcome, view.attempts, view.epoch) == ("COMPLETED", "failed", 2, 2)
    assert view.error.status_code == 503 and view.error.error_type == "runner_disconnected"


def test_jobs_past_their_start_deadline_are_failed_with_the_fal_timeout(env: Env):
    store = env.open()
    cancelled = submit(store, start_timeout_s=1.0)
    started = submit(store, start_timeout_s=1.0)
    on_time = submit(store, start_timeout_s=60)
    bulk = submit(store, "k2", start_timeout_s=1.0)
    late = submit(store, start_timeout_s=1.0)
    store.cancel(cancelled, "k1")  # finished already: the deadline does not touch it
    job = store.claim("r", 0.2)
    assert job.request_id == started
    time.sleep(1.1)
    assert store.expire_start_deadlines() == 2  # `late` and `bulk`; the started job is exempt
    claimed = store.claim("r", 30)  # re-queued `started` (lease expired) is claimed again despite its deadline
    assert claimed.request_id == started and claimed.epoch == 2
    for job_id, owner in ((late, "k1"), (bulk, "k2")):
        view = store.get(job_id, owner)
        assert (view.status, view.outcome) == ("COMPLETED", "failed")
        assert view.error == JobError(status_code=504, detail="Request timed out before it started",
                                      error_type="request_timeout", message="Request timed out before it started",
                                      timeout_type="user")
    assert store.get(on_time, "k1").status == "IN_QUEUE"
    assert store.get(cancelled, "k1").outcome == "cancelled"


def test_claim_fails_a_late_job_instead_of_starting_it(env: Env):
    store = env.open()
    late, fine = submit(store, start_timeout_s=0.15), submit(store)
    time.sleep(0.3)
    assert store.claim("r", 30).request_id == fine
    assert store.get(late, "k1").error.error_type == "request_timeout"


# -- webhooks ---------------------------------------------------------------------------------------------------------
def test_webhook_delivery_is_claimed_once_and_fenced_by_attempt(env: Env):
    a, b = env.open(), env.open()
    job_id = submit(a, webhook_url="https://hooks.example.invalid/x")
    no_hook = submit(a)
    for _ in range(2):
        job = a.claim("r", 30)
        a.complete(job.request_id, job.epoch, result={"video": "k"}, result_keys=["k"])
    assert a.webhook_state(no_hook) is None
    assert a.webhook_state(job_id) == {"state": "pending", "attempts": 0, "last_error": None}

    got: list[list] = []
    barrier = threading.Barrier(2)

    def grab(store: SyncJobStore, worker: str) -> None:
        barrier.wait()
        got.append(store.claim_webhooks(worker, 0.3))

    threads = [threading.Thread(target=grab, args=(s, w)) for s, w in ((a, "w1"), (b, "w2"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deliveries = [d for batch in got for d in batch]
    assert [(d.request_id, d.owner, d.attempt, d.url) for d in deliveries] == [
        (job_id, "k1", 1, "https://hooks.example.invalid/x")]
    assert a.webhook_failed(job_id, 1, "HTTP 500", retry_in_s=0.6, message="webhook attempt 1 failed (HTTP 500)")
    assert b.claim_webhooks("w2", 30) == []  # not due yet
    time.sleep(0.7)
    second = b.claim_webhooks("w2", 30)
    assert [(d.request_id, d.attempt) for d in second] == [(job_id, 2)]
    assert a.webhook_delivered(job_id, 1) is False  # a stale attempt's report is refused
    assert b.webhook_delivered(job_id, 2, message="webhook delivered (attempt 2, HTTP 200)") is True
    assert a.webhook_state(job_id) == {"state": "delivered", "attempts": 2, "last_error": "HTTP 500"}
    assert a.claim_webhooks("w1", 30) == []
    assert log_messages(a, job_id)[-2:] == ["webhook attempt 1 failed (HTTP 500)",
                                            "webhook delivered (attempt 2, HTTP 200)"]


def test_webhook_whose_worker_died_is_due_again_and_can_be_given_up(env: Env):
    store = env.open()
    job_id = submit(store, webhook_url="https://hooks.example.invalid/y")
    job = store.claim("r", 30)
    store.complete(job_id, job.epoch, error=JobError(status_code=422, detail="bad", message="bad"))
    assert [d.attempt for d in store.claim_webhooks("w1", 0.2)] == [1]
    time.sleep(0.3)  # w1 died without reporting: its lease ran out
    retry = store.claim_webhooks("w2", 30)
    assert [d.attempt for d in retry] == [2]
    assert store.webhook_failed(job_id, 2, "connection refused", retry_in_s=None) is True
    assert store.webhook_state(job_id) == {"state": "failed", "attempts": 2, "last_error": "connection refused"}
    assert store.claim_webhooks("w3", 30) == []


# -- retention --------------------------------------------------------------------------------------------------------
def _finish(store: SyncJobStore, owner: str = "k1", error: bool = False, checkpoint: bool = False,
            input_keys: tuple[str, ...] = ()) -> str:
    job_id = submit(store, owner, input_keys=input_keys)
    job = store.claim("r", 30)
    assert job.request_id == job_id
    if checkpoint:
        store.record_checkpoint(job_id, job.epoch, f"checkpoints/{job_id}/e1/latents.pt", 2)
    if error:
        store.complete(job_id, job.epoch, error=JobError(status_code=500, detail="boom", message="boom"))
    else:
        store.complete(job_id, job.epoch, result={"video": f"results/{job_id}/e1/output.mp4"},
                       result_keys=[f"results/{job_id}/e1/output.mp4"])
    return job_id


def _sweep(store: SyncJobStore, kind: str, ttl: float, batch: int) -> tuple[list[str], list[int]]:
    """What a sweeper does: expired batch -> (delete objects) -> purge, until nothing is left."""
    keys, sizes = [], []
    while True:
        items = store.expired(kind, ttl, limit=batch)
        if not items:
            return keys, sizes
        sizes.append(len(items))
        keys += [k for item in items for k in item.keys]
        assert store.purge(kind, [item.request_id for item in items], ttl) == len(items)


def test_retention_removes_only_what_expired_in_bounded_batches(env: Env):
    store = env.open()
    old = [_finish(store, input_keys=(f"inputs/old{i}.png",)) for i in range(3)]
    old_failed = _finish(store, error=True, checkpoint=True, input_keys=("inputs/oldf.png",))
    store.create_sync(app_id="a", input=INPUT, seed=1, runner_id="g", lease_s=60, owner="k1", rate_limited=False)
    queued_old = submit(store, priority="low")  # old but unfinished (and claimed after the others): kept
    time.sleep(1.0)
    recent = _finish(store, checkpoint=True, input_keys=("inputs/new.png",))
    ttl = 0.6  # old rows are 1.0 s old, the recent one has 0.6 s of sweeping before it expires too

    keys, sizes = _sweep(store, "results", ttl, batch=2)
    assert sizes == [2, 1]
    assert sorted(keys) == sorted(f"results/{j}/e1/output.mp4" for j in old)
    assert all(store.get(j, "k1").result_purged for j in old) and not store.get(recent, "k1").result_purged
    assert not store.get(old_failed, "k1").result_purged  # it had no result objects: an error, not a 410

    keys, sizes = _sweep(store, "inputs", ttl, batch=3)
    assert sizes == [3, 1] and sorted(keys) == ["inputs/old0.png", "inputs/old1.png", "inputs/old2.png",
                                                "inputs/oldf.png"]
    keys, _ = _sweep(store, "checkpoints", ttl, batch=10)
    assert keys == [f"checkpoints/{old_failed}/e1/latents.pt"]  # the failed job's; the recent one is kept

    logs_before = sql(store, "SELECT count(*) AS n FROM job_logs")[0]["n"]
    keys, sizes = _sweep(store, "jobs", ttl, batch=3)
    assert sizes == [3, 1] and keys == []  # every object of these rows was already swept
    for job_id in [*old, old_failed]:
        assert store.get(job_id, "k1") is None
        assert sql(store, "SELECT count(*) AS n FROM job_logs WHERE request_id = ?", (job_id,))[0]["n"] == 0
    assert sql(store, "SELECT count(*) AS n FROM job_logs")[0]["n"] < logs_before
    assert store.get(recent, "k1").status == "COMPLETED" and store.get(queued_old, "k1").status == "IN_QUEUE"
    assert store.running_count("k1") == 1
    # a row swept directly as "jobs" hands back every key it still owns
    assert [i.keys for i in store.expired("jobs", 0.0)] == [[
        "inputs/new.png", f"results/{recent}/e1/output.mp4", f"checkpoints/{recent}/e1/latents.pt"]]
    assert store.purge("jobs", [recent, queued_old], 3600) == 0  # the TTL is re-checked at purge time


# -- server-issued ids, maintenance, shared secrets ----------------------------------------------------------------
def test_an_id_issued_before_the_row_keys_the_job_and_nothing_else_is_accepted(env: Env):
    store = env.open()
    issued = new_request_id()
    assert submit(store, request_id=issued) == issued
    claimed = store.create_sync(app_id="a", input=INPUT, seed=1, runner_id="r", lease_s=30, owner="k1",
                                rate_limited=False, request_id=new_request_id())
    assert claimed.request_id != issued and len(claimed.request_id) == 32
    for bad in ("client-chosen-id", issued.upper(), issued + "0", ""):
        with pytest.raises(ValueError, match="32 lowercase hex digits"):
            submit(store, request_id=bad)
    import psycopg

    with pytest.raises((sqlite3.IntegrityError, psycopg.errors.UniqueViolation)):  # taken: never a second row
        submit(store, request_id=issued)
    assert sql(store, "SELECT count(*) AS n FROM jobs WHERE request_id = ?", (issued,))[0]["n"] == 1


def test_maintain_expires_leases_and_start_deadlines_without_claiming(env: Env):
    store = env.open()
    running = submit(store)
    job = store.claim("r", 0.2)
    late = submit(store, start_timeout_s=0.2)
    waiting = submit(store)
    time.sleep(0.5)
    assert store.maintain() == (1, 1)
    assert store.get(running, "k1").status == "IN_QUEUE"  # its lease ran out: queued again, not claimed
    assert store.get(late, "k1").error.error_type == "request_timeout"
    assert store.get(waiting, "k1").status == "IN_QUEUE"
    with pytest.raises(FencedError):
        store.heartbeat(running, job.epoch, 30)
    assert store.maintain() == (0, 0)


def test_shared_secret_is_created_once_for_every_store_on_the_database(env: Env):
    first, second = env.open(), env.open()
    values: list[str] = []
    barrier = threading.Barrier(4)

    def ask(store: SyncJobStore) -> None:
        barrier.wait()
        values.append(store.shared_secret("url-signing"))

    threads = [threading.Thread(target=ask, args=(s,)) for s in (first, second, first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(values)) == 1 and len(values[0]) >= 40
    assert first.shared_secret("another") != values[0]
    with pytest.raises(ValueError, match="secret name"):
        first.shared_secret("Bad Name")
    assert first.ping() is True


def test_every_store_error_survives_pickling_with_its_fields():
    """Ray pickles an exception raised in one replica (the Orchestrator's create_sync) to re-raise it in another
    (the Gateway answers 429 naming the limit); one that does not unpickle becomes an opaque 500."""
    import pickle

    errors = [QueueFullError("full"), KeyQueueCapError("queued"), KeyRunningCapError("running"),
              RateLimitedError("slow down", 2.5), FencedError("abc", 3, "complete"), MigrationError("newer")]
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)
        assert vars(copy) == vars(error)


# -- schema and logs --------------------------------------------------------------------------------------------------
def test_migrations_are_idempotent_and_safe_when_processes_starttogether(env: Env, tmp_path: Path):
    config = env.fresh_config(tmp_path)
    applied: list[list[int]] = []
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            applied.append(env.open(config).migrations_applied)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    every = [m.version for m in MIGRATIONS]
    assert every == list(range(1, len(every) + 1))
    assert sorted(applied) == [[], [], [], every]
    store = env.open(config)
    assert store.migrations_applied == []
    assert [r["version"] for r in sql(store, "SELECT version FROM schema_migrations ORDER BY version")] == every
    with store.backend.write() as cur:
        cur.execute(store.backend.sql("INSERT INTO schema_migrations (version, name, applied_at) "
                                      "VALUES (99, 'from the future', 0)"))
    with pytest.raises(MigrationError, match="schema version 99"):
        env.open(config)


def test_log_lines_are_bounded_per_job_and_read_incrementally(env: Env):
    store = env.open(max_log_lines=5)
    job_id = submit(store)
    job = store.claim("r", 30)
    page = store.logs(job_id, "k1")
    assert [(line.line, line.message) for line in page.lines] == [(1, "queued (normal priority)"), (2, "started")]
    for i in range(10):
        store.log(job_id, job.epoch, f"line {i}", "WARN" if i % 2 else "INFO")
    assert sql(store, "SELECT count(*) AS n FROM job_logs WHERE request_id = ?", (job_id,))[0]["n"] == 5
    page = store.logs(job_id, "k1", since=page.cursor)
    assert [line.line for line in page.lines] == [8, 9, 10, 11, 12]  # 3..7 were trimmed before we read
    assert [line.message for line in page.lines] == [f"line {i}" for i in range(5, 10)]
    assert page.lines[-1].level == "WARN" and page.lines[0].timestamp.endswith("Z")
    assert store.logs(job_id, "k1", since=page.cursor).lines == []
    snapshot = store.status(job_id, "k1", logs_since=10)
    assert [line.line for line in snapshot.logs.lines] == [11, 12] and snapshot.job.log_count == 12
    with pytest.raises(ValueError, match="log level"):
        store.log(job_id, job.epoch, "x", "LOUD")


# -- async facade and configuration -----------------------------------------------------------------------------------
def test_async_store_waits_in_a_thread_never_on_the_event_loop(env: Env):
    """A submit blocked on the database (another connection holds the write / submit lock) must leave the event
    loop free: a ticker keeps running until the lock is released and the submit completes."""
    store = make_job_store(env.config, env.default_path)
    blocker_release = threading.Event()
    held = threading.Event()

    def hold_lock() -> None:
        if env.kind == "sqlite":
            conn = sqlite3.connect(env.default_path, isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            held.set()
            blocker_release.wait(10)
            conn.execute("COMMIT")
            conn.close()
        else:
            with store.sync.backend.write() as cur:
                store.sync.backend.lock(cur, "submit")
                held.set()
                blocker_release.wait(10)

    async def scenario() -> tuple[int, str]:
        holder = threading.Thread(target=hold_lock)
        holder.start()
        assert held.wait(10)
        pending = asyncio.ensure_future(store.submit(app_id="a", input=INPUT, seed=1, owner="k1"))
        ticks = 0
        while ticks < 20:
            await asyncio.sleep(0.01)
            ticks += 1
        assert not pending.done()  # still waiting for the lock, in its thread
        blocker_release.set()
        submitted = await asyncio.wait_for(pending, 10)
        holder.join()
        return ticks, submitted.request_id

    try:
        ticks, request_id = asyncio.run(scenario())
        assert ticks == 20
        assert store.sync.get(request_id, "k1").status == "IN_QUEUE"
    finally:
        blocker_release.set()
        store.close()


def test_jobs_config_reads_the_dsn_from_env_or_file_never_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    adapter = TypeAdapter(JobsConfig)
    sqlite_config = adapter.validate_python({"kind": "sqlite"})
    assert isinstance(sqlite_config, SqliteJobsConfig) and sqlite_config.path is None
    with pytest.raises(ValidationError, match="dsn"):
        adapter.validate_python({"kind": "postgres", "dsn": "postgresql://u:secret@h/db"})
    pg_config = adapter.validate_python({"kind": "postgres", "dsn_env": "MY_JOBS_DSN"})
    monkeypatch.delenv("MY_JOBS_DSN", raising=False)
    monkeypatch.delenv("MY_JOBS_DSN_FILE", raising=False)
    with pytest.raises(ValueError, match="MY_JOBS_DSN"):
        pg_config.dsn()
    monkeypatch.setenv("MY_JOBS_DSN", "host=db user=app password=s3cret")
    assert pg_config.dsn() == "host=db user=app password=s3cret"
    secret = tmp_path / "dsn"
    secret.write_text("host=secret-db user=app\n")
    monkeypatch.setenv("MY_JOBS_DSN_FILE", str(secret))  # a mounted Secret wins over the plain variable
    assert pg_config.dsn() == "host=secret-db user=app"
    assert PostgresJobsConfig(dsn_file=secret).dsn() == "host=secret-db user=app"
    with pytest.raises(ValueError, match="cannot be read"):
        PostgresJobsConfig(dsn_file=tmp_path / "missing").dsn()
    with pytest.raises(ValidationError, match="pool_min_size"):
        PostgresJobsConfig(pool_min_size=9, pool_max_size=2)
    # the embedded default: a SQLite file at the default path, WAL mode
    store = make_sync_job_store(None, tmp_path / "root" / "jobs.sqlite3")
    try:
        assert store.backend.name == "sqlite" and (tmp_path / "root" / "jobs.sqlite3").is_file()
        assert sql(store, "PRAGMA journal_mode")[0]["journal_mode"] == "wal"
    finally:
        store.close()


def test_postgres_reads_survive_connections_dropped_by_the_server(postgres: Postgres, tmp_path: Path):
    """A failover or restart drops pooled connections: the next read runs again on a fresh one, a write raises
    the driver's OperationalError once (its caller answers 503) and the one after it works."""
    import psycopg

    dsn = postgres.create_database("drop")
    file = tmp_path / "dsn"
    file.write_text(dsn)
    store = make_sync_job_store(PostgresJobsConfig(dsn_file=file, pool_min_size=2, pool_max_size=2), tmp_path)
    try:
        job_id = submit(store)

        def drop_all() -> int:
            with psycopg.connect(postgres.dsn(), autocommit=True) as admin:
                return len(admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                    "pg_backend_pid()", (dsn.split("dbname=")[1].split()[0],)).fetchall())

        assert drop_all() >= 1
        assert store.get(job_id, "k1").status == "IN_QUEUE"
        assert store.status(job_id, "k1").position == 0
        drop_all()
        with pytest.raises(psycopg.OperationalError):  # the write that finds out is not retried
            store.heartbeat(job_id, 1, 30)
        with pytest.raises(FencedError):  # the next write reaches the database (the job is not running)
            store.heartbeat(job_id, 1, 30)
        assert store.claim("r", 30).request_id == job_id
    finally:
        store.close()
        postgres.drop_database(dsn)


def test_async_store_exposes_every_operation_of_the_blocking_one(tmp_path: Path):
    from deployments.jobstore import JobStore

    blocking = {n for n in vars(SyncJobStore) if not n.startswith("_") and callable(getattr(SyncJobStore, n))}
    missing = {n for n in blocking - {"close"} if not asyncio.iscoroutinefunction(getattr(JobStore, n, None))}
    assert missing == set()
    store = make_job_store(SqliteJobsConfig(), tmp_path / "jobs.sqlite3")
    try:
        async def roundtrip() -> tuple[Any, Any]:
            submitted = await store.submit(app_id="a", input=INPUT, seed=1, owner="k1")
            return submitted, await store.status(submitted.request_id, "k1", logs_since=0)

        submitted, snapshot = asyncio.run(roundtrip())
        assert snapshot.job.request_id == submitted.request_id and snapshot.logs.lines[0].line == 1
    finally:
        store.close()
