"""Retention against real parts: the job store on SQLite and PostgreSQL (a throw-away cluster), objects on local
storage and on a real S3 server (SeaweedFS). Rows are back-dated in the database; objects are made "old" by
creating them before a cut-off time (local files also get back-dated mtimes; S3 stamps LastModified itself, to the
second, so those tests wait a few seconds around the cut-off)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import ValidationError

from deployments.config import AppArgs
from deployments.contracts import StoredResult, StoredVideo
from deployments.gateway.results import RESULT_EXPIRED, result_answer
from deployments.jobstore import (
    JobError,
    JobLimits,
    JobStore,
    PostgresJobsConfig,
    SqliteJobsConfig,
    SyncJobStore,
)
from deployments.jobstore import make_sync_job_store as open_store
from deployments.jobstore.schema import MIGRATIONS
from deployments.orchestrator.retention import (
    DAY,
    LEASE_NAME,
    RetentionConfig,
    RetentionSweeper,
    SweepReport,
    sweep_once,
)
from deployments.storage import (
    LocalStorage,
    LocalStorageConfig,
    ObjectInfo,
    S3Storage,
    Storage,
)
from testing.postgres import Postgres

DEFAULTS = RetentionConfig()
INPUT = {"image_url": "stored", "audio_url": "https://example.invalid/a.wav", "prompt": "hi"}


# -- fixtures: a database and a storage, each on both backends --------------------------------------------------------
@dataclass
class Db:
    """One database for one test; ``open()`` gives another store instance on it (another "application")."""

    kind: str
    config: SqliteJobsConfig | PostgresJobsConfig
    path: Path
    stores: list[SyncJobStore] = field(default_factory=list)

    def open(self) -> SyncJobStore:
        store = open_store(self.config, self.path, JobLimits(max_queued_per_owner=1000, max_queue_length=10_000))
        self.stores.append(store)
        return store


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.database)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    pg: Postgres | None = None
    if request.param == "sqlite":
        d = Db("sqlite", SqliteJobsConfig(synchronous="NORMAL"), tmp_path / "jobs.sqlite3")
    else:
        pg = request.getfixturevalue("postgres")
        dsn = pg.create_database("ret")
        (tmp_path / "dsn").write_text(dsn)
        d = Db("postgres", PostgresJobsConfig(dsn_file=tmp_path / "dsn", pool_max_size=4), tmp_path / "unused")
    yield d
    for store in d.stores:
        store.close()
    if pg is not None:
        pg.drop_database(dsn)


@dataclass
class Objects:
    """A storage, a second instance on the same place (another application), and a way to age objects."""

    kind: str
    storage: Storage
    make_other: Any

    def put(self, *keys: str) -> None:
        for key in keys:
            self.storage.put_bytes(key, f"bytes of {key}".encode(), "application/octet-stream")

    def cut(self, old_keys: list[str]) -> float:
        """Make ``old_keys`` (just written) older than the returned epoch time and everything written after it
        younger. Local: back-date the files' mtimes. S3 stamps LastModified to the second: wait around the cut."""
        if isinstance(self.storage, LocalStorage):
            past = time.time() - 60
            for key in old_keys:
                os.utime(self.storage.path_for(key), (past, past))
            return time.time() - 30
        time.sleep(1.2)
        cut = time.time()
        time.sleep(1.2)
        return cut

    def keys(self) -> set[str]:
        return set(self.storage.list_keys())


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.database)])
def objects(request: pytest.FixtureRequest, tmp_path: Path) -> Objects:
    if request.param == "local":
        config = LocalStorageConfig(root=tmp_path / "store")
        return Objects("local", LocalStorage(config), lambda: LocalStorage(config))
    server = request.getfixturevalue("s3_env")
    config = server.storage_config()
    return Objects("s3", S3Storage(config), lambda: S3Storage(config))


def sql(store: SyncJobStore, text: str, params: tuple = ()) -> list[dict[str, Any]]:
    with store.backend.write() as cur:
        cur.execute(store.backend.sql(text), params)
        try:
            return cur.fetchall()
        except Exception:  # noqa: BLE001 - a statement without rows (psycopg raises, sqlite returns [])
            return []


def back_date(store: SyncJobStore, request_id: str, seconds: float) -> None:
    """Move a job's times ``seconds`` into the past (the store ages rows by the database's clock)."""
    sql(store, "UPDATE jobs SET created_at = created_at - ?, started_at = started_at - ?, "
               "completed_at = completed_at - ? WHERE request_id = ?", (seconds, seconds, seconds, request_id))


def run(coro):
    return asyncio.run(coro)


async def sweep(sync: SyncJobStore, storage: Storage, now: float, retention: RetentionConfig = DEFAULTS,
                **kwargs: Any) -> SweepReport:
    store = JobStore(sync)
    try:
        return await sweep_once(store, storage, retention, now, **kwargs)
    finally:
        store._executor.shutdown(wait=True)  # the SyncJobStore is closed by the fixture


# -- a world of jobs and objects of every kind, old and new ------------------------------------------------------------
@dataclass
class World:
    ids: dict[str, str]
    cut: float
    keep: set[str]  # keys that must survive a sweep with the default TTLs, a day after the cut
    gone: set[str]  # keys that sweep must delete
    untouched: set[str]  # outside the swept prefixes
    week_later: set[str]  # deleted too by a sweep a week after the cut (by the objects' clock)


def build_world(store: SyncJobStore, objs: Objects) -> World:
    """Jobs (ages in days: A 8, B 2, C 1/24, D 2 failed, E 2 cancelled, F 31; G queued, H running) with an input, a
    result and a checkpoint each where their state allows, and loose objects: orphans and named ones, old and new."""
    ids: dict[str, str] = {}

    def job(name: str, outcome: str | None, checkpoint: bool = True, age_days: float = 0.0) -> str:
        input_key = f"inputs/k1/{name}-{uuid.uuid4().hex[:6]}/face.png"
        objs.put(input_key)
        job_id = store.submit(app_id="a", input=INPUT, seed=1, owner="k1", input_keys=[input_key],
                              rate_limited=False).request_id
        ids[name] = job_id
        if outcome == "cancelled":
            assert store.cancel(job_id, "k1") == "CANCELLATION_REQUESTED"
        elif outcome is not None:
            claimed = store.claim("runner", 60)
            assert claimed.request_id == job_id
            if checkpoint:
                key = f"checkpoints/{job_id}/e1/latents.pt"
                objs.put(key)
                store.record_checkpoint(job_id, claimed.epoch, key, 3)
            if outcome == "ok":
                key = f"results/{job_id}/e1/output.mp4"
                objs.put(key)
                store.complete(job_id, claimed.epoch, result=stored_output(key, 10, 1), result_keys=[key])
            elif outcome == "failed":
                store.complete(job_id, claimed.epoch, error=JobError(status_code=500, detail="boom", message="boom"))
        back_date(store, job_id, age_days * DAY)
        return job_id

    for name, outcome, age in (("A", "ok", 8), ("B", "ok", 2), ("C", "ok", 1 / 24), ("D", "failed", 2),
                               ("E", "cancelled", 2), ("F", "ok", 31)):
        job(name, outcome, age_days=age)
    job("H", "running")  # claimed, checkpointed, still running
    h = ids["H"]
    claimed_h_epoch = store.get(h, "k1").epoch
    objs.put(f"checkpoints/{h}/e2/latents.pt")  # its newer checkpoint replaces e1: e1 is a leftover to delete
    assert store.record_checkpoint(h, claimed_h_epoch, f"checkpoints/{h}/e2/latents.pt", 6) == \
        f"checkpoints/{h}/e1/latents.pt"
    used_upload = "uploads/k1/u3/used.png"
    objs.put(used_upload)
    # queued for days; reads an old upload (named in its input, as the Gateway stores an upload URL, not in
    # input_keys: the upload is not the job's to delete)
    ids["G"] = store.submit(app_id="a", input={**INPUT, "stored": {"image_url": used_upload}}, seed=1, owner="k1",
                            rate_limited=False).request_id
    back_date(store, ids["G"], 3 * DAY)
    stale_result = "results/" + "d" * 32 + "/e2/output.mp4"  # a fenced runner's; 7 days to live, as results
    orphans = {"uploads/k1/u1/face.png", stale_result, "inputs/k2/x/orphan.png", f"checkpoints/{h}/e1/latents.pt"}
    untouched = {"jobs/legacy.json", "_internal/signing-secret"}
    objs.put(*orphans - {f"checkpoints/{h}/e1/latents.pt"}, *untouched)
    everything_old = objs.keys()
    cut = objs.cut(sorted(everything_old))
    young = {"uploads/k1/u2/new.png", "inputs/k2/y/new.png", "results/" + "e" * 32 + "/e1/output.mp4"}
    objs.put(*young)

    i = ids
    gone = orphans - {stale_result} | {
        f"results/{i['A']}/e1/output.mp4", f"results/{i['F']}/e1/output.mp4",
        *(k for k in everything_old if k.startswith("inputs/k1/") and not k.startswith(("inputs/k1/C-",
                                                                                      "inputs/k1/H-"))),
        *(f"checkpoints/{i[n]}/e1/latents.pt" for n in ("A", "B", "D", "F")),
    }
    keep = (objs.keys() - gone - untouched)
    assert {f"results/{i['B']}/e1/output.mp4", f"checkpoints/{i['C']}/e1/latents.pt", used_upload,
            f"checkpoints/{h}/e2/latents.pt"} <= keep
    week_later = {stale_result, "uploads/k1/u2/new.png", "inputs/k2/y/new.png"}  # young results stay 7 days
    return World(ids, cut, keep, gone, untouched, week_later)


EXPECTED_OBJECTS = {"results": 2, "inputs": 6, "uploads": 1, "checkpoints": 5}
EXPECTED_ORPHANS = {"results": 0, "inputs": 1, "uploads": 1, "checkpoints": 1}
EXPECTED_ROWS = {"results": 2, "inputs": 5, "checkpoints": 4, "jobs": 1}


def check_swept_world(store: SyncJobStore, objs: Objects, world: World, week_later: bool = False) -> None:
    assert objs.keys() == (world.keep - (world.week_later if week_later else set())) | world.untouched
    i = world.ids
    assert store.get(i["F"], "k1") is None  # 31 days: the record went too, with its logs
    assert sql(store, "SELECT count(*) AS n FROM job_logs WHERE request_id = ?", (i["F"],))[0]["n"] == 0
    assert store.get(i["A"], "k1").result_purged and not store.get(i["B"], "k1").result_purged
    assert store.get(i["G"], "k1").status == "IN_QUEUE" and store.get(i["H"], "k1").status == "IN_PROGRESS"
    assert store.get(i["H"], "k1").checkpoint_step == 6
    assert [store.get(i[n], "k1").checkpoint_step for n in "ABD"] == [None, None, None]
    assert store.get(i["C"], "k1").checkpoint_step == 3


def test_a_sweep_deletes_exactly_what_expired_and_a_second_finds_nothing(db: Db, objects: Objects):
    store = db.open()
    world = build_world(store, objects)
    report = run(sweep(store, objects.storage, world.cut + DAY))  # listed objects age against the cut

    assert report.swept and not report.lease_lost
    assert report.objects == EXPECTED_OBJECTS and report.orphans == EXPECTED_ORPHANS
    assert report.rows == EXPECTED_ROWS and report.failed == dict.fromkeys(EXPECTED_OBJECTS, 0)
    assert report.deleted() == {**EXPECTED_OBJECTS, "jobs": 1}
    check_swept_world(store, objects, world)

    again = run(sweep(store, objects.storage, world.cut + DAY))
    assert again.swept and sum(again.deleted().values()) == 0 and sum(again.rows.values()) == 0
    assert objects.keys() == world.keep | world.untouched

    # a week after the cut by the objects' clock (rows keep aging by the database's): loose objects past their own
    # TTL go (the stale result, young uploads and inputs); what rows name and young results stay
    week = run(sweep(store, objects.storage, world.cut + 7 * DAY))
    assert week.orphans == {"results": 1, "inputs": 1, "uploads": 1, "checkpoints": 0} and week.rows == dict.fromkeys(
        EXPECTED_ROWS, 0)
    assert objects.keys() == (world.keep - world.week_later) | world.untouched
    check_swept_world(store, objects, world, week_later=True)


def test_a_sweep_prunes_expired_idempotency_keys_and_upload_rows(db: Db, tmp_path: Path):
    """The tables with a time to live of their own: what expired goes, in batches; what lives stays."""
    short = open_store(db.config, db.path, JobLimits(idempotency_ttl_s=0.3, upload_ttl_s=0.3))
    long = open_store(db.config, db.path, JobLimits(idempotency_ttl_s=3600, upload_ttl_s=3600))
    db.stores += [short, long]
    body = "0" * 64
    live = long.submit(app_id="a", input=INPUT, seed=1, owner="k1", idempotency_key="live", body_hash=body,
                       rate_limited=False).request_id
    long.reserve_upload("k1", "uploads/k1/live/a.png", 10)
    for i in range(3):
        short.submit(app_id="a", input=INPUT, seed=1, owner="k1", idempotency_key=f"old-{i}", body_hash=body,
                     rate_limited=False)
        short.reserve_upload("k1", f"uploads/k1/old-{i}/a.png", 10)
    time.sleep(0.4)
    report = run(sweep(long, LocalStorage(LocalStorageConfig(root=tmp_path / "data")), time.time(), batch_size=2))
    assert (report.idempotency_keys, report.upload_rows) == (3, 3)
    assert long.idempotent_request("k1", "live") == (live, body)
    assert [r["key"] for r in sql_rows(long, "SELECT key FROM idempotency_keys")] == ["live"]
    assert long.upload_usage("k1").uploads == 1
    assert sql_rows(long, "SELECT count(*) AS n FROM upload_usage")[0]["n"] == 1


def sql_rows(store: SyncJobStore, text: str) -> list[dict[str, Any]]:
    with store.backend.read() as cur:
        cur.execute(store.backend.sql(text))
        return cur.fetchall()


# -- bounded batches -------------------------------------------------------------------------------------------------
class Spy:
    """The real store or storage underneath; records the size of every batch it was handed or returned."""

    def __init__(self, target: Any, sizes: dict[str, list[int]]):
        self._target, self.sizes = target, sizes

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if name not in ("expired", "purge", "named_keys", "delete_many"):
            return attr

        def record(*args: Any, **kwargs: Any) -> Any:
            batch = next(a for a in args if isinstance(a, list | tuple | set)) if name != "expired" else None
            out = attr(*args, **kwargs)
            if asyncio.iscoroutine(out):
                async def later() -> Any:
                    result = await out
                    self.sizes[name].append(len(result) if batch is None else len(batch))
                    return result
                return later()
            self.sizes[name].append(len(batch))
            return out

        return record


def test_sweeps_work_in_bounded_batches(tmp_path: Path):
    sync = open_store(SqliteJobsConfig(synchronous="NORMAL"), tmp_path / "jobs.sqlite3",
                      JobLimits(max_queued_per_owner=100))
    storage = LocalStorage(LocalStorageConfig(root=tmp_path / "store"))
    try:
        for n in range(7):
            key = f"results/{n:032x}/e1/output.mp4"
            storage.put_bytes(key, b"v", "video/mp4")
            job_id = sync.submit(app_id="a", input=INPUT, seed=1, owner="k1", rate_limited=False).request_id
            claimed = sync.claim("r", 60)
            sync.complete(job_id, claimed.epoch, result=stored_output(key, 1, 1), result_keys=[key])
            back_date(sync, job_id, 8 * DAY)
        for n in range(8):
            storage.put_bytes(f"uploads/k1/{n}/f.png", b"u", "image/png")
        cut = Objects("local", storage, None).cut(storage.list_keys("uploads/"))
        sizes: dict[str, list[int]] = {"expired": [], "purge": [], "named_keys": [], "delete_many": []}
        store = Spy(JobStore(sync), sizes)

        report = run(sweep_once(store, Spy(storage, sizes), DEFAULTS, cut + DAY, batch_size=3))
        assert report.rows["results"] == 7 and report.objects == {"results": 7, "inputs": 0, "uploads": 8,
                                                                  "checkpoints": 0}
        assert max(sizes["expired"] + sizes["purge"] + sizes["named_keys"] + sizes["delete_many"]) == 3
        # named_keys: the expired rows' keys (is an unfinished job reading one?), then the uploads listing
        assert sizes["purge"] == [3, 3, 1] and sizes["named_keys"] == [3, 3, 1, 3, 3, 2]
        assert storage.list_keys() == []
    finally:
        sync.close()


def test_an_expired_result_a_queued_job_reads_stays_until_that_job_ends(db: Db, tmp_path: Path):
    """A client may give an earlier result of its own as the input of a new job. If that result expires while the
    job waits, the record answers 410 at once, but the file stays until the job that reads it has finished."""
    store = db.open()
    storage = LocalStorage(LocalStorageConfig(root=tmp_path / "store"))
    key = "results/" + "b" * 32 + "/e1/output.mp4"
    storage.put_bytes(key, b"video", "video/mp4")
    os.utime(storage.path_for(key), (time.time() - 8 * DAY, time.time() - 8 * DAY))
    old = store.submit(app_id="a", input=INPUT, seed=1, owner="k1", rate_limited=False).request_id
    claimed = store.claim("r", 60)
    store.complete(old, claimed.epoch, result=stored_output(key, 5, 1), result_keys=[key])
    back_date(store, old, 8 * DAY)
    reader = store.submit(app_id="a", input={**INPUT, "stored": {"image_url": key}}, seed=2, owner="k1",
                          rate_limited=False).request_id

    report = run(sweep(store, storage, time.time()))
    assert report.rows["results"] == 1 and store.get(old, "k1").result_purged  # 410 for the old request
    assert report.objects["results"] == 0 and storage.exists(key)  # the queued job still reads it
    assert store.cancel(reader, "k1") == "CANCELLATION_REQUESTED"
    report = run(sweep(store, storage, time.time()))
    assert report.orphans["results"] == 1 and not storage.exists(key)


# -- one sweeper at a time ---------------------------------------------------------------------------------------------
def test_two_applications_sweeping_at_once_never_double_delete_or_fail(db: Db, objects: Objects):
    first, second = db.open(), db.open()
    world = build_world(first, objects)
    other_storage = objects.make_other()

    async def both() -> list[SweepReport]:
        a, b = JobStore(first), JobStore(second)
        try:
            return list(await asyncio.gather(
                sweep_once(a, objects.storage, DEFAULTS, world.cut + DAY, owner="app-blue", batch_size=2),
                sweep_once(b, other_storage, DEFAULTS, world.cut + DAY, owner="app-green", batch_size=2)))
        finally:
            a._executor.shutdown()
            b._executor.shutdown()

    reports = run(both())
    ran = [r for r in reports if r.swept]
    skipped = [r for r in reports if not r.swept]
    assert len(ran) == 1 and len(skipped) == 1  # the lease let one through
    assert skipped[0].lease_holder in ("app-blue", "app-green") and sum(skipped[0].deleted().values()) == 0
    assert ran[0].objects == EXPECTED_OBJECTS and ran[0].rows == EXPECTED_ROWS
    check_swept_world(first, objects, world)


def test_overlapping_sweeps_without_the_lease_are_harmless(db: Db, objects: Objects):
    """What a sweeper that stalled past its lease meets: another sweep over the same rows and objects. Both finish
    without an error, each row is purged by exactly one of them, and the result is the same as one sweep."""
    first, second = db.open(), db.open()
    world = build_world(first, objects)
    other_storage = objects.make_other()

    async def both() -> list[SweepReport]:
        a, b = JobStore(first), JobStore(second)
        try:
            return list(await asyncio.gather(
                sweep_once(a, objects.storage, DEFAULTS, world.cut + DAY, batch_size=1, use_lease=False),
                sweep_once(b, other_storage, DEFAULTS, world.cut + DAY, batch_size=1, use_lease=False)))
        finally:
            a._executor.shutdown()
            b._executor.shutdown()

    reports = run(both())
    assert all(r.swept and sum(r.failed.values()) == 0 for r in reports)
    assert {kind: sum(r.rows[kind] for r in reports) for kind in EXPECTED_ROWS} == EXPECTED_ROWS
    check_swept_world(first, objects, world)


def test_maintenance_lease_admits_one_owner_until_it_expires_or_is_released(db: Db):
    a, b = db.open(), db.open()
    assert a.lease_holder(LEASE_NAME) is None
    epoch = a.acquire_lease(LEASE_NAME, "a", 30)
    assert epoch == 1 and b.acquire_lease(LEASE_NAME, "b", 30) is None
    assert a.renew_lease(LEASE_NAME, "a", epoch, 30) and not b.renew_lease(LEASE_NAME, "b", epoch, 30)
    assert a.release_lease(LEASE_NAME, "a", epoch)
    b_epoch = b.acquire_lease(LEASE_NAME, "b", 0.3)  # released: free at once
    assert b_epoch == 2 and b.lease_holder(LEASE_NAME)["owner"] == "b"
    assert not a.renew_lease(LEASE_NAME, "a", epoch, 30) and not a.release_lease(LEASE_NAME, "a", epoch)
    time.sleep(0.5)  # b stopped renewing: its lease ran out
    a_epoch = a.acquire_lease(LEASE_NAME, "a", 30)
    assert a_epoch == 3 and not b.renew_lease(LEASE_NAME, "b", b_epoch, 30)  # b is fenced
    assert a.release_lease(LEASE_NAME, "a", a_epoch, keep_s=60)  # kept: nobody else until the next interval
    assert b.acquire_lease(LEASE_NAME, "b", 30) is None and a.acquire_lease(LEASE_NAME, "a", 30) == 4
    with pytest.raises(ValueError, match="lease_s"):
        a.acquire_lease("other", "a", 0)

    winners: list[int | None] = []
    barrier = threading.Barrier(6)

    def contend(name: str) -> None:
        store = db.open()
        barrier.wait()
        winners.append(store.acquire_lease("race", name, 30))

    threads = [threading.Thread(target=contend, args=(f"p{n}",)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(winners, key=lambda w: w is None) == [1, None, None, None, None, None]


def test_named_keys_are_the_keys_live_rows_still_point_to(db: Db):
    store = db.open()
    reads = {**INPUT, "stored": {"image_url": "uploads/k1/u/face.png", "audio_url": "results/old/e1/o.mp4"}}
    queued = store.submit(app_id="a", input=reads, seed=1, owner="k1", input_keys=["inputs/q.png"],
                          rate_limited=False).request_id
    done = store.submit(app_id="a", input=INPUT, seed=1, owner="k1", input_keys=["inputs/d.png"],
                        rate_limited=False).request_id
    claimed = store.claim("r", 60)
    assert claimed.request_id == queued
    store.record_checkpoint(queued, claimed.epoch, "checkpoints/q/e1/l.pt", 1)
    store.release(queued, claimed.epoch, "shutting down")  # re-queued: it resumes from that checkpoint
    claimed = store.claim("r", 60)
    assert claimed.request_id == queued  # its old place
    claimed_done = store.claim("r", 60)
    store.record_checkpoint(done, claimed_done.epoch, "checkpoints/d/e1/l.pt", 1)
    store.complete(done, claimed_done.epoch, result=stored_output("results/d/e1/o.mp4", 1, 1),
                   result_keys=["results/d/e1/o.mp4"])
    every = ["inputs/q.png", "inputs/d.png", "checkpoints/q/e1/l.pt", "checkpoints/d/e1/l.pt",
             "results/d/e1/o.mp4", "uploads/k1/u/face.png", "results/old/e1/o.mp4", "results/zz/e1/o.mp4",
             "uploads/k1/v/x.png"]
    assert store.named_keys(every) == set(every[:7])
    assert store.named_keys(every, read_by_unfinished_only=True) == {"uploads/k1/u/face.png", "results/old/e1/o.mp4"}
    back_date(store, done, 10 * DAY)
    for kind in ("results", "inputs", "checkpoints"):
        assert store.purge(kind, [done], DAY) == 1
    assert store.named_keys(every) == set(every[:7]) - set(every[1:5:2]) - {every[4]}  # purged: no one's
    store.complete(queued, claimed.epoch, error=JobError(status_code=500, detail="x", message="x"))
    # finished: what it read is no longer protected; its own inputs and checkpoint are, until purged
    assert store.named_keys(every) == {"inputs/q.png", "checkpoints/q/e1/l.pt"}
    assert store.named_keys([]) == set()
    with pytest.raises(ValueError, match="at most 1000"):
        store.named_keys([f"k{n}" for n in range(1001)])


def test_the_lease_table_migrates_onto_an_existing_database(db: Db):
    store = db.open()
    job_id = store.submit(app_id="a", input=INPUT, seed=1, owner="k1", rate_limited=False).request_id
    sql(store, "DROP TABLE maintenance_leases")
    sql(store, "DELETE FROM schema_migrations WHERE version = 3")  # as a database made by the release before
    store.close()
    db.stores.remove(store)
    upgraded = db.open()
    assert upgraded.migrations_applied == [3] and [m.version for m in MIGRATIONS][:3] == [1, 2, 3]
    assert upgraded.get(job_id, "k1").status == "IN_QUEUE" and upgraded.acquire_lease(LEASE_NAME, "x", 5) == 1


# -- the loop the Orchestrator replicas run ---------------------------------------------------------------------------
def test_sweepers_in_many_replicas_take_turns_and_keep_deleting(tmp_path: Path):
    """Three replicas run the loop with a 0.3 s interval while uploads keep arriving (one every 0.2 s, 0.5 s to
    live): sweeps never overlap, each upload is deleted exactly once, and the ones left are young."""
    config = SqliteJobsConfig(synchronous="NORMAL")
    retention = RetentionConfig(uploads_s=0.5, sweep_interval_s=0.3)
    storage = LocalStorage(LocalStorageConfig(root=tmp_path / "store"))
    syncs = [open_store(config, tmp_path / "jobs.sqlite3") for _ in range(3)]
    windows: list[tuple[float, float, str, int]] = []

    async def scenario() -> list[RetentionSweeper]:
        sweepers = []
        for n, sync in enumerate(syncs):
            def hook(report: SweepReport, owner: str = f"replica-{n}") -> None:
                end = time.monotonic()
                windows.append((end - report.duration_s, end, owner, report.objects["uploads"]))
            sweeper = RetentionSweeper(JobStore(sync), storage, retention, owner=f"replica-{n}", on_report=hook)
            assert sweeper.loop.ensure_running()
            assert not sweeper.loop.ensure_running()  # idempotent: still one loop
            sweepers.append(sweeper)
        for n in range(12):
            await asyncio.to_thread(storage.put_bytes, f"uploads/k1/{n}/f.png", b"u", "image/png")
            await asyncio.sleep(0.2)
        # Until a sweep has started when every upload was past its TTL (bounded: the sweepers may be slow).
        all_expired_at = time.monotonic() + retention.uploads_s + 0.1
        while not any(start >= all_expired_at for start, *_ in list(windows)):
            assert time.monotonic() < all_expired_at + 30, windows
            await asyncio.sleep(0.05)
        for sweeper in sweepers:
            await sweeper.loop.stop()
            assert not sweeper.loop.alive and not sweeper.loop.ensure_running()  # stopped for good
        return sweepers

    try:
        sweepers = run(scenario())
        windows.sort()
        assert len(windows) >= 4 and sum(s.sweeps for s in sweepers) == len(windows), windows
        assert all(prev[1] <= nxt[0] + 1e-3 for prev, nxt in zip(windows, windows[1:], strict=False)), windows
        remaining = storage.list_keys("uploads/")
        assert sum(w[3] for w in windows) + len(remaining) == 12  # each deleted once, none lost otherwise
        assert remaining == []  # the last sweep found every upload expired
        assert sum(1 for w in windows if w[3]) >= 2, windows  # and earlier ones deleted while uploads came in
    finally:
        for sync in syncs:
            sync.close()


# -- the 410 answer ---------------------------------------------------------------------------------------------------
def test_an_expired_result_answers_410_never_a_broken_link(tmp_path: Path):
    sync = open_store(SqliteJobsConfig(synchronous="NORMAL"), tmp_path / "jobs.sqlite3")
    storage = LocalStorage(LocalStorageConfig(root=tmp_path / "store", url_expiry_s=3 * DAY), b"link-secret")
    try:
        key = "results/" + "a" * 32 + "/e1/output.mp4"
        storage.put_bytes(key, b"video", "video/mp4")
        job_id = sync.submit(app_id="a", input=INPUT, seed=1, owner="k1", rate_limited=False).request_id
        claimed = sync.claim("r", 60)
        sync.complete(job_id, claimed.epoch, result=stored_output(key, 5, 11), result_keys=[key])
        failed_id = sync.submit(app_id="a", input=INPUT, seed=1, owner="k1", rate_limited=False).request_id
        claimed = sync.claim("r", 60)
        sync.complete(failed_id, claimed.epoch, error=JobError(status_code=422, detail="bad audio",
                                                               error_type="audio_invalid", message="bad audio"))
        job = sync.get(job_id, "k1")
        now = job.completed_at

        fresh = result_answer(job, storage, DEFAULTS.results_s, now=now)  # 7 days left: the storage's 3 days
        assert fresh.status_code == 200 and fresh.body["seed"] == 11 and fresh.body["video"]["file_size"] == 5
        exp = int(parse_qs(urlsplit(fresh.body["video"]["url"]).query)["exp"][0])
        assert abs(exp - (time.time() + 3 * DAY)) < 5
        late = result_answer(job, storage, DEFAULTS.results_s, now=now + 6.5 * DAY)  # half a day left: cut to it
        exp = int(parse_qs(urlsplit(late.body["video"]["url"]).query)["exp"][0])
        assert late.status_code == 200 and abs(exp - (time.time() + 0.5 * DAY)) < 5

        # past the TTL but not swept yet: already 410, no link to a file about to go
        expired = result_answer(job, storage, DEFAULTS.results_s, now=now + 7 * DAY + 1)
        assert expired.status_code == 410 and expired.body["error_type"] == RESULT_EXPIRED
        assert "expired" in expired.body["detail"] and "7 days" in expired.body["detail"]
        assert job_id in expired.body["detail"] and expired.headers["x-fal-error-type"] == RESULT_EXPIRED

        back_date(sync, job_id, 8 * DAY)
        back_date(sync, failed_id, 8 * DAY)
        report = run(sweep(sync, storage, time.time()))
        assert report.rows["results"] == 1 and not storage.exists(key)
        purged = sync.get(job_id, "k1")
        assert purged.result_purged
        answer = result_answer(purged, storage, DEFAULTS.results_s)  # purged: 410 whatever the clock says
        assert answer.status_code == 410 and "url" not in str(answer.body)

        failed = result_answer(sync.get(failed_id, "k1"), storage, DEFAULTS.results_s)
        assert (failed.status_code, failed.body) == (422, {"detail": "bad audio", "error_type": "audio_invalid"})
        with pytest.raises(ValueError, match="not finished"):
            queued = sync.submit(app_id="a", input=INPUT, seed=1, owner="k1", rate_limited=False).request_id
            result_answer(sync.get(queued, "k1"), storage, DEFAULTS.results_s)
    finally:
        sync.close()


# -- the retention: block ---------------------------------------------------------------------------------------------
def test_retention_block_defaults_and_validation():
    r = RetentionConfig()
    assert (r.results_s, r.uploads_s, r.inputs_s, r.jobs_s, r.checkpoints_s, r.sweep_interval_s) == (
        7 * DAY, DAY, DAY, 30 * DAY, DAY, 600)
    assert set(RetentionConfig.model_fields) == {"results_s", "uploads_s", "inputs_s", "jobs_s", "checkpoints_s",
                                                 "sweep_interval_s"}
    with pytest.raises(ValidationError, match=r"jobs_s \(3600\) must be at least retention.results_s"):
        RetentionConfig(jobs_s=3600)
    with pytest.raises(ValidationError, match="retention.checkpoints_s"):
        RetentionConfig(jobs_s=2 * DAY, results_s=DAY, checkpoints_s=3 * DAY)
    for bad in ({"results_s": 0}, {"uploads_s": -1}, {"sweep_interval_s": 0}, {"sweep_interval_s": 2 * DAY},
                {"results": 5}):
        with pytest.raises(ValidationError):
            RetentionConfig(**bad)

    args = AppArgs(retention={"results_s": 3600, "inputs_s": 600})
    assert args.retention.results_s == 3600 and args.storage.url_expiry_s == 3600  # the default follows
    with pytest.raises(ValidationError, match=r"url_expiry_s \(7200\) must not exceed retention.results_s"):
        AppArgs(retention={"results_s": 3600}, storage={"kind": "local", "url_expiry_s": 7200})
    with pytest.raises(ValidationError, match=r"url_expiry_s \(604800\) must not exceed"):
        AppArgs(retention={"results_s": DAY}, storage={"kind": "s3", "bucket": "bkt", "url_expiry_s": 604800},
                jobs={"kind": "postgres"})
    assert AppArgs(storage={"kind": "local", "url_expiry_s": 600}).storage.url_expiry_s == 600


# -- storage: listing with ages, batch delete -------------------------------------------------------------------------
def test_listing_with_ages_streams_filters_and_limits(objects: Objects):
    storage = objects.storage
    old = ["uploads/a/1/x.png", "uploads/a/2/y.png", "uploads/b/1/z.png", "uploadsX/n.png"]
    objects.put(*old)
    cut = objects.cut(old)
    objects.put("uploads/a/3/new.png", "results/r/out.mp4")
    listed = list(storage.list_objects("uploads/"))
    assert [o.key for o in listed] == ["uploads/a/1/x.png", "uploads/a/2/y.png", "uploads/a/3/new.png",
                                       "uploads/b/1/z.png"]
    assert all(isinstance(o, ObjectInfo) and o.size == len(f"bytes of {o.key}") for o in listed)
    assert all(o.last_modified < cut for o in listed if "new" not in o.key)
    assert [o.last_modified >= cut for o in listed] == [False, False, True, False]
    assert [o.key for o in storage.list_objects("uploads/", modified_before=cut)] == old[:3]
    assert [o.key for o in storage.list_objects("uploads", modified_before=cut)] == old
    assert [o.key for o in storage.list_objects("uploads/", modified_before=cut, limit=2)] == old[:2]
    assert list(storage.list_objects("none/")) == []
    with pytest.raises(ValueError):
        list(storage.list_objects("../x"))


def test_batch_delete_removes_keys_and_local_empty_directories(objects: Objects):
    storage = objects.storage
    keys = [f"results/{n:04d}/e1/output.mp4" for n in range(1203)] if objects.kind == "s3" else \
        [f"results/{n:04d}/e1/output.mp4" for n in range(30)]
    if objects.kind == "s3":  # 1203 objects: DeleteObjects in chunks of 1000 (write them in parallel threads)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda k: storage.put_bytes(k, b"v", "video/mp4"), keys))
    else:
        objects.put(*keys)
    objects.put("results/keep/out.mp4")
    assert storage.delete_many(keys + ["results/missing/out.mp4"]) == {}
    assert storage.list_keys("results/") == ["results/keep/out.mp4"]
    assert storage.delete_many([]) == {}
    with pytest.raises(ValueError):
        storage.delete_many(["results/ok.mp4", "../escape"])
    if isinstance(storage, LocalStorage):
        assert sorted(p.name for p in (storage.root / "results").iterdir()) == ["keep"]  # emptied dirs removed
        storage.delete_many(["results/keep/out.mp4"])
        assert not (storage.root / "results").exists() and storage.root.is_dir()
        storage.put_bytes("results/again/out.mp4", b"v", "video/mp4")  # writing into a removed dir works
        assert storage.get_bytes("results/again/out.mp4") == b"v"


def test_an_object_that_cannot_be_deleted_is_reported_and_holds_up_nothing(tmp_path: Path):
    """A real per-key failure (a name longer than the filesystem allows: unlink fails with ENAMETOOLONG): the
    local batch delete reports it, the sweep counts it, still purges the row (the object is left to the orphan
    pass) and goes on with the rows behind it."""
    sync = open_store(SqliteJobsConfig(synchronous="NORMAL"), tmp_path / "jobs.sqlite3")
    storage = LocalStorage(LocalStorageConfig(root=tmp_path / "store"))
    try:
        bad = "inputs/k1/" + "n" * 300 + ".png"
        storage.put_bytes("inputs/k1/0.png", b"i", "image/png")  # the directory exists: the name is what fails
        failed = storage.delete_many(["inputs/k1/absent.png", bad])
        assert list(failed) == [bad] and "OSError" in failed[bad]
        ids = []
        for n, keys in enumerate(([bad], [f"inputs/k1/{n}.png" for n in range(3)])):
            for key in keys if n else []:
                storage.put_bytes(key, b"i", "image/png")
            ids.append(sync.submit(app_id="a", input=INPUT, seed=1, owner="k1", input_keys=keys,
                                   rate_limited=False).request_id)
            claimed = sync.claim("r", 60)
            sync.complete(ids[-1], claimed.epoch, error=JobError(status_code=500, detail="x", message="x"))
            back_date(sync, ids[-1], 2 * DAY - n)  # the failing row is the oldest: first in every batch
        report = run(sweep(sync, storage, time.time(), batch_size=1))
        assert report.failed["inputs"] == 1 and report.objects["inputs"] == 3 and report.rows["inputs"] == 2
        assert storage.list_keys() == [] and sync.named_keys([bad]) == set()
    finally:
        sync.close()


# -- the service: Orchestrator replicas sweep, the Gateway answers 410, counts exported per kind ---------------------
def _retention_metric(url: str, application: str) -> dict[str, float]:
    """``ray_stable_avatar_retention_deleted_total`` of one Serve application per ``kind``, summed over the replica
    tags."""
    import re

    from testing.http import http_bytes

    totals: dict[str, float] = {}
    for line in http_bytes(url).decode().splitlines():
        match = re.match(r"^ray_stable_avatar_retention_deleted_total\{([^}]*)\} (\S+)$", line)
        if not match or f'application="{application}"' not in match.group(1):
            continue
        kind = re.search(r'kind="([^"]*)"', match.group(1))
        if kind:
            totals[kind.group(1)] = totals.get(kind.group(1), 0.0) + float(match.group(2))
    return totals


def _until(what: str, check: Any, timeout_s: float = 90, every_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, f"{what}: not within {timeout_s} s"
            return value
        time.sleep(every_s)


def test_the_service_sweeps_what_expired_and_answers_410(tmp_path: Path, serve_cluster):
    """A real application (tiny preset, SQLite beside local storage) with TTLs of seconds: the result is served with
    a link that ends with the file, then answers 410; the Orchestrator replicas' sweeper deletes the job's inputs
    and result and an abandoned upload, exports the counts per kind, and finally drops the record (404)."""
    from ray import serve

    from testing.http import http_bytes, http_json
    from testing.media import EXAMPLE_AUDIO, EXAMPLE_IMAGE, data_uri

    app, application = "fal-ai/stable-avatar", "retention"
    root = tmp_path / "data"
    ttl = {"results_s": 12, "uploads_s": 12, "inputs_s": 12, "checkpoints_s": 12, "jobs_s": 18,
           "sweep_interval_s": 0.5}
    abandoned = root / "uploads" / "k9" / "u1" / "face.png"
    abandoned.parent.mkdir(parents=True)
    abandoned.write_bytes(b"never used")
    os.utime(abandoned, (time.time() - DAY, time.time() - DAY))
    serve_cluster.deploy({"device": "cpu", "storage": serve_cluster.local_storage(root), "retention": ttl,
                          "orchestrator": {"num_replicas": 2}}, name=application)
    body = {"image_url": data_uri(EXAMPLE_IMAGE, "image/png"), "audio_url": data_uri(EXAMPLE_AUDIO, "audio/wav"),
            "prompt": "a person talking", "num_inference_steps": 1, "seed": 3, "aspect_ratio": "1:1"}
    code, submitted, _ = http_json("POST", f"{serve_cluster.base}/{app}", body)
    assert code == 200, submitted
    request_id = submitted["request_id"]
    status_url = f"{serve_cluster.base}/{app}/requests/{request_id}/status"
    _until("the job completes", lambda: http_json("GET", status_url)[1]["status"] == "COMPLETED", 240, 0.25)
    code, result, _ = http_json("GET", f"{serve_cluster.base}/{app}/requests/{request_id}")
    served_at = time.time()
    assert code == 200, result
    link = result["video"]["url"]
    assert int(parse_qs(urlsplit(link).query)["exp"][0]) <= served_at + ttl["results_s"]  # ends with the file
    assert len(http_bytes(link)) == result["video"]["file_size"]
    stored = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
              and p.relative_to(root).parts[0] in ("inputs", "results")}
    assert {k.split("/")[0] for k in stored} == {"inputs", "results"} and len(stored) == 3  # 2 inputs, 1 video

    code, gone, headers = _until("the result expires", lambda: (r := http_json(
        "GET", f"{serve_cluster.base}/{app}/requests/{request_id}"))[0] == 410 and r, 60)
    assert gone["error_type"] == "result_expired" and "expired" in gone["detail"]
    assert headers["x-fal-error-type"] == "result_expired" and headers["x-fal-request-id"] == request_id
    _until("the sweep deletes the objects", lambda: not any((root / k).exists() for k in stored)
           and not abandoned.exists(), 60)
    assert http_json("GET", status_url)[0] == 200  # the record outlives its objects (jobs_s)
    _until("the record goes too", lambda: http_json("GET", status_url)[0] == 404, 60)
    # Each replica's counts reach the metrics agent on their own schedule: wait for all of them, then compare.
    expected = {"results": 1, "inputs": 2, "uploads": 1, "jobs": 1}
    seen: list[dict[str, float]] = []
    _until(f"the counts reach Prometheus as {expected}",
           lambda: seen.append(_retention_metric(serve_cluster.metrics_url, application)) or seen[-1] == expected,
           60, 1.0)
    assert seen[-1] == expected
    serve.delete(application)  # its replicas stopped: nothing writes any more
    assert not (root / "results").exists() and not (root / "inputs").exists()  # emptied directories removed too


def stored_output(key: str, file_size: int, seed: int) -> dict:
    """A result as a runner records it."""
    return StoredResult(video=StoredVideo(key=key, file_size=file_size), seed=seed).model_dump()
