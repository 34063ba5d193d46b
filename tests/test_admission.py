"""An Orchestrator replica's admission: long jobs cannot hold every slot while a short one waits.

The rule (``DenoiseAdmission``) on its own, then through the real runner (``JobRunner``, a real SQLite jobs
database): with one regular slot held by a long job and a second long job waiting, a short job submitted after
both is claimed, runs in the short-job slot and finishes while the long jobs are still there.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from deployments.config import AppArgs
from deployments.contracts import StoredResult, StoredVideo
from deployments.jobstore import SqliteJobsConfig, make_job_store
from deployments.orchestrator.admission import DenoiseAdmission
from deployments.orchestrator.runner import JobRunner, Run, RunReporter
from deployments.storage import LocalStorage, LocalStorageConfig
from deployments.storage.keys import result_key

SHORT, LONG = 100, 1000  # guidance rows; short jobs have at most 750


def test_short_jobs_take_the_reserved_slot_and_long_ones_wait_for_a_regular_one():
    async def scenario() -> None:
        admission = DenoiseAdmission(slots=2, short_slots=1, short_rows=750, ageing_s=600)
        first, second = await admission.admit(LONG), await admission.admit(LONG)
        assert not admission.fits(LONG) and admission.fits(SHORT)
        short = await admission.admit(SHORT)  # the reserved slot
        assert (admission.running, admission.running_long) == (3, 2)
        waiting = [asyncio.ensure_future(admission.admit(w)) for w in (LONG * 3, SHORT, LONG)]
        await asyncio.sleep(0)
        assert admission.waiting == 3 and not any(t.done() for t in waiting)
        short.release()  # frees the reserved slot: only the short job fits there
        await asyncio.sleep(0)
        assert [t.done() for t in waiting] == [False, True, False]
        first.release()  # a regular slot: the waiting long job with less work goes first
        await asyncio.sleep(0)
        assert [t.done() for t in waiting] == [False, True, True]
        second.release()
        await asyncio.sleep(0)
        assert all(t.done() for t in waiting) and admission.waiting == 0
        for ticket in (t.result() for t in waiting):
            ticket.release()
            ticket.release()  # idempotent
        assert (admission.running, admission.running_long) == (0, 0)

    asyncio.run(asyncio.wait_for(scenario(), 5))


def test_a_long_waiting_job_ages_past_newer_shorter_ones():
    now = [0.0]

    async def scenario() -> list[int]:
        admission = DenoiseAdmission(slots=1, short_slots=0, short_rows=0, ageing_s=100, clock=lambda: now[0])
        held = await admission.admit(LONG)
        oldest = asyncio.ensure_future(admission.admit(LONG * 10))  # waits from t = 0
        await asyncio.sleep(0)
        now[0] = 95.0  # its priority: 10000 x 0.05 = 500
        newer = [asyncio.ensure_future(admission.admit(w)) for w in (600, 400)]
        await asyncio.sleep(0)
        order = []
        for _ in range(3):
            held.release()
            await asyncio.sleep(0)
            done = [t for t in (oldest, *newer) if t.done() and t not in order]
            assert len(done) == 1
            order.append(done[0])
            held = done[0].result()
        held.release()
        return [[oldest, *newer].index(t) for t in order]

    assert asyncio.run(asyncio.wait_for(scenario(), 5)) == [2, 0, 1]  # 400, then the aged 10000, then 600


def test_claims_go_on_while_jobs_wait_for_a_slot_and_a_cancelled_waiter_frees_its_place():
    async def scenario() -> None:
        admission = DenoiseAdmission(slots=1, short_slots=1, short_rows=750, ageing_s=600)
        assert admission.may_claim(1) and not admission.may_claim(2)  # 1 regular + 1 short slot
        held = await admission.admit(LONG)
        waiter = asyncio.ensure_future(admission.admit(LONG))
        await asyncio.sleep(0)
        assert admission.may_claim(2) and not admission.may_claim(3)  # one more while it waits
        waiter.cancel()
        await asyncio.sleep(0)
        assert admission.waiting == 0 and not admission.may_claim(2)
        held.release()
        assert admission.running == 0

    asyncio.run(asyncio.wait_for(scenario(), 5))


def test_the_settings_are_checked():
    with pytest.raises(ValueError, match="slots"):
        DenoiseAdmission(slots=0, short_slots=1, short_rows=1, ageing_s=1)


# -- through the runner and a real jobs database ------------------------------------------------------------------

class AdmittedPipeline:
    """Stands in for the Orchestrator's ``_execute``: the job's work is in its prompt; it is admitted as the
    Orchestrator admits it (slot held until the run's task ends), then runs one step per 100 rows."""

    def __init__(self, admission: DenoiseAdmission, storage: LocalStorage, step_s: float = 0.1):
        self.admission, self.storage, self.step_s = admission, storage, step_s
        self.started: dict[str, float] = {}
        self.finished: dict[str, float] = {}

    async def __call__(self, run: Run, report: RunReporter) -> StoredResult:
        work = int(run.job.input["request"]["prompt"])
        ticket = await self.admission.admit(work)
        asyncio.current_task().add_done_callback(lambda _task: ticket.release())
        self.started[run.request_id] = time.monotonic()
        for _ in range(work // 100):
            await asyncio.sleep(self.step_s)
        key = result_key(run.request_id, run.epoch)
        run.uncommitted.add(key)
        async with run.writing_objects(final=True):
            await asyncio.to_thread(self.storage.put_bytes, key, b"video", "video/mp4")
        self.finished[run.request_id] = time.monotonic()
        return StoredResult(video=StoredVideo(key=key, file_size=5), seed=run.job.seed)


def job_input(work: int) -> dict:
    return {"request": {"image_url": "https://example.invalid/a.png", "audio_url": "https://example.invalid/a.wav",
                        "prompt": str(work)}, "stored": {}}


def test_a_short_job_submitted_behind_two_long_ones_finishes_first(tmp_path: Path):
    args = AppArgs(storage=LocalStorageConfig(root=tmp_path / "data"), max_running_jobs=1, short_job_slots=1,
                   dispatch={"lease_s": 10.0, "heartbeat_s": 0.5, "poll_interval_s": 0.05, "webhook_lease_s": 20})
    storage = LocalStorage(args.storage)
    store = make_job_store(SqliteJobsConfig(synchronous="NORMAL"), tmp_path / "jobs.sqlite3", args.job_limits())

    async def scenario() -> dict[str, str]:
        admission = DenoiseAdmission(args.max_running_jobs, args.short_job_slots, args.short_job_rows,
                                     args.admission_ageing_s)
        pipeline = AdmittedPipeline(admission, storage)
        runner = JobRunner(store, storage, args, "runner-a", pipeline, may_claim=admission.may_claim)
        ids = {}
        for name, work in (("long-1", 3000), ("long-2", 3000), ("short", 300)):
            ids[name] = (await store.submit(app_id="a", input=job_input(work), seed=1, rate_limited=False)).request_id
        runner.loop.ensure_running()
        deadline = time.monotonic() + 60
        while len(pipeline.finished) < 3:
            assert time.monotonic() < deadline, (pipeline.started, pipeline.finished)
            await asyncio.sleep(0.05)
        await runner.stop()
        return {name: request_id for name, request_id in ids.items()}

    try:
        ids = asyncio.run(scenario())
        order = sorted(ids, key=lambda name: store.sync.get(ids[name]).completed_at)
        assert order == ["short", "long-1", "long-2"], order
        assert all(store.sync.get(i).status == "COMPLETED" for i in ids.values())
    finally:
        store.close()
