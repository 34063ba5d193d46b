"""An idle runner learns of a new job without polling on PostgreSQL (LISTEN/NOTIFY), and polls on SQLite."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from deployments.jobstore import JobStore, SqliteJobsConfig, make_sync_job_store
from tests.job_store_env import Env, pg_env_fixture, submit  # noqa: F401

WAIT_S = 30.0  # far longer than a notification takes: a wait that returns True was woken, not timed out
WAKE_BOUND_S = 5.0  # generous on a loaded 2-core machine; the notification itself takes milliseconds


def wait_in_thread(wait) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        out["woke"] = wait()
        out["at"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_an_idle_runner_on_postgres_wakes_when_a_job_of_its_model_is_queued(pg_env: Env):
    runner, gateway = pg_env.open(), pg_env.open()
    assert runner.wait_for_job(0.1, model_fingerprint="w1") is False  # nothing queued; starts the listener
    assert runner.backend.listener.listening.is_set()

    thread, out = wait_in_thread(lambda: runner.wait_for_job(WAIT_S, model_fingerprint="w1"))
    time.sleep(0.3)
    submit(gateway, model_fingerprint="w2")  # another model's job wakes nobody here
    time.sleep(0.3)
    assert "woke" not in out
    submitted_at = time.monotonic()
    job_id = submit(gateway, model_fingerprint="w1")
    thread.join(WAIT_S + 5)
    assert out["woke"] is True and out["at"] - submitted_at < WAKE_BOUND_S
    job = runner.claim("r", 30, model_fingerprint="w1")
    assert job.request_id == job_id

    # a job queued while nobody waits (between an empty claim and the wait) answers the next wait at once
    runner.release(job_id, job.epoch, "shutting down")  # a release re-queues, and announces it
    started = time.monotonic()
    assert runner.wait_for_job(WAIT_S, model_fingerprint="w1") is True
    assert time.monotonic() - started < WAKE_BOUND_S
    assert runner.wait_for_job(0.2, model_fingerprint="w1") is False  # that notification was answered


def test_an_awaiting_runner_on_postgres_is_woken_without_blocking_its_event_loop(pg_env: Env):
    runner, gateway = JobStore(pg_env.open()), pg_env.open()

    async def scenario() -> tuple[bool, float, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        waiting = asyncio.ensure_future(runner.wait_for_job(WAIT_S))
        while not runner.sync.backend.listener.listening.is_set():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        submitted_at = time.monotonic()
        await asyncio.to_thread(submit, gateway)
        woke = await asyncio.wait_for(waiting, WAIT_S + 5)
        ticker.cancel()
        return woke, time.monotonic() - submitted_at, ticks

    try:
        woke, after_s, ticks = asyncio.run(scenario())
        assert woke is True and after_s < WAKE_BOUND_S and ticks >= 10
    finally:
        runner._executor.shutdown(wait=True)  # the fixture closes the blocking store


def test_on_sqlite_a_wait_is_the_pause_between_polls(tmp_path: Path):
    store = make_sync_job_store(SqliteJobsConfig(path=tmp_path / "jobs.sqlite3"), tmp_path)
    try:
        submit(store)
        started = time.monotonic()
        assert store.wait_for_job(0.2) is False  # no notifications: the caller claims again after the pause
        assert time.monotonic() - started >= 0.2
        assert store.claim("r", 30) is not None
    finally:
        store.close()
