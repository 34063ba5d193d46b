"""Retention: every object and job row has a time to live; a sweeper deletes what expired (no Ray in here).

The ``retention:`` block of the app args (:class:`RetentionConfig`) gives one TTL per kind of thing.
:func:`sweep_once` removes what expired, in bounded batches:

1. **Rows first, then what they name.** For ``results``, ``inputs``, ``checkpoints`` and finally ``jobs`` it asks
   the job store for finished jobs past the TTL (``expired``), deletes the objects they name, then marks them
   purged (``purge``; ``jobs`` deletes the rows with their logs and webhook, after deleting every key they still
   own). A result marked purged answers 410 (:func:`deployments.gateway.results.result_answer`). Objects first, rows
   after: a crash in between only repeats the deletes. An object that cannot be deleted is counted as failed
   and its row purged all the same: the object is then an orphan that step 2 tries again at every sweep, and a
   key that keeps failing never holds up the rows behind it. So is an object that an unfinished job reads (an
   earlier result given as its input): step 2 deletes it once that job has finished.
2. **Orphans, by listing.** Objects under ``uploads/``, ``inputs/``, ``results/`` and ``checkpoints/`` older than
   their TTL (the object's own time) that no row names (``named_keys``): uploads never used, the result or
   checkpoint a fenced runner wrote before it died, inputs of a submit that failed after writing them.
   An object a row still names is left to step 1 (an unfinished job keeps its inputs and checkpoint, and the
   uploads or earlier results its input reads). The listing is streamed, ``batch_size`` objects at a time.
3. The tables with a time to live of their own are pruned: idle rate-limit buckets, expired idempotency keys
   (``idempotency_window_s``) and the upload-quota rows of uploads retention has deleted.

**One sweeper at a time, and harmless if not.** Many Orchestrator replicas, in one or several applications
sharing the database (a RayService upgrade), all run :class:`RetentionSweeper`; a sweep first takes the
``retention`` lease row in the job store (the same database for all of them), renews it after every batch and,
when done, keeps it for most of ``sweep_interval_s``, so the whole deployment sweeps about once per interval
and never twice at once. Should a stalled sweeper overlap the next one anyway (its lease ran out), every step
is idempotent: deleting a deleted object is no error, ``purge`` re-checks its predicate in the database (a row
is counted by the one sweep that changed it), and nothing a row still names is deleted as an orphan.

Times: rows expire by the database's clock, listed objects by the storage's (S3 ``LastModified``, file mtimes)
against ``now`` (this process's clock); the TTLs are hours to days, so seconds of clock skew do not matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.runtime.background import BackgroundLoop
from deployments.storage.keys import OBJECT_KINDS, ObjectKind, object_kind

if TYPE_CHECKING:
    from deployments.jobstore import ExpiredItem, JobStore
    from deployments.storage import ObjectInfo, Storage

logger = logging.getLogger("ray.serve")

HOUR = 3600.0
DAY = 24 * HOUR
LEASE_NAME = "retention"
DEFAULT_BATCH = 500  # rows or listed objects handled per step (one storage request, one purge)
DEFAULT_LEASE_S = 300.0  # renewed after every batch; a sweeper that died frees it after this long
HOLD_FRACTION = 0.9  # after a sweep the lease is kept for this share of the interval: one sweep per interval
NAMED_KEYS_CHUNK = 1000  # keys per named_keys query (the store's bound)

ROW_KINDS = ("results", "inputs", "checkpoints", "jobs")  # jobs last: it deletes what the others left
ORPHAN_KINDS = OBJECT_KINDS  # every object kind may have orphans
METRIC_KINDS = ("results", "inputs", "uploads", "checkpoints", "jobs")


class RetentionConfig(BaseModel):
    """How long each kind of thing is kept, in seconds (the ``retention:`` block of the app args).

    Results, inputs and checkpoints count from the job's completion (failed and cancelled jobs included) and,
    for objects no row names, from the object's own time; uploads from the upload. ``jobs_s`` must be at least
    ``results_s``, ``inputs_s`` and ``checkpoints_s``: a job's record must outlive every object it points to, so a
    result link is always built from a live record, and an expired result answers 410 ("expired") from its record
    instead of 404 ("never existed"). ``storage.url_expiry_s`` must not exceed ``results_s``, or a link would
    outlive its file: ``AppArgs`` refuses a value written above it (validated, not clamped: the configuration
    says what links do) and lowers the default to ``results_s``; each link is also cut to its result's remaining
    lifetime when it is made (:func:`deployments.gateway.results.result_answer`).
    """

    model_config = ConfigDict(extra="forbid")

    results_s: float = Field(7 * DAY, gt=0, description="result videos, from the job's completion")
    uploads_s: float = Field(DAY, gt=0, description="files uploaded through the storage upload routes")
    inputs_s: float = Field(DAY, gt=0, description="inputs written at submit (data: URIs), from completion")
    jobs_s: float = Field(30 * DAY, gt=0, description="job records (status, logs, webhook state), from completion")
    checkpoints_s: float = Field(DAY, gt=0, description="latent checkpoints of finished jobs (failed, cancelled)")
    sweep_interval_s: float = Field(600.0, gt=0, le=DAY, description="how often the sweeper runs (one at a time)")

    @model_validator(mode="after")
    def _records_outlive_objects(self) -> RetentionConfig:
        for name in ("results_s", "inputs_s", "checkpoints_s"):
            if self.jobs_s < getattr(self, name):
                raise ValueError(f"retention.jobs_s ({self.jobs_s:g}) must be at least retention.{name} "
                                 f"({getattr(self, name):g}): a job's record must outlive the objects it names")
        return self

    def check_link_lifetime(self, url_expiry_s: float) -> None:
        """Refuse links that would outlive the file they point to."""
        if url_expiry_s > self.results_s:
            raise ValueError(f"storage.url_expiry_s ({url_expiry_s:g}) must not exceed retention.results_s "
                             f"({self.results_s:g}): a result link would outlive its file")

    def ttl(self, kind: str) -> float:
        return float(getattr(self, f"{kind}_s"))


class SweepReport(BaseModel):
    """What one sweep did. ``objects``: objects deleted per kind (from expired rows and orphans together);
    ``orphans``: of those, found by listing; ``rows``: rows purged per kind (``jobs``: deleted); ``failed``:
    objects that could not be deleted (tried again by the orphan listing of every later sweep)."""

    swept: bool = True  # False: another process held the lease, nothing was done
    lease_holder: str | None = None
    lease_lost: bool = False  # the lease was taken over mid-sweep: stopped early
    objects: dict[str, int] = Field(default_factory=lambda: dict.fromkeys(ORPHAN_KINDS, 0))
    orphans: dict[str, int] = Field(default_factory=lambda: dict.fromkeys(ORPHAN_KINDS, 0))
    rows: dict[str, int] = Field(default_factory=lambda: dict.fromkeys(ROW_KINDS, 0))
    failed: dict[str, int] = Field(default_factory=lambda: dict.fromkeys(ORPHAN_KINDS, 0))
    listed: int = 0  # objects older than their TTL seen by the orphan listing
    rate_buckets: int = 0
    idempotency_keys: int = 0  # expired keys pruned
    upload_rows: int = 0  # upload-quota rows of deleted uploads pruned
    duration_s: float = 0.0

    def deleted(self) -> dict[str, int]:
        """The ``stable_avatar_retention_deleted_total`` increments: objects per kind, and job rows as ``jobs``."""
        return {**{kind: self.objects[kind] for kind in ORPHAN_KINDS}, "jobs": self.rows["jobs"]}

    def summary(self) -> str:
        deleted = ", ".join(f"{k} {n}" for k, n in self.deleted().items())
        orphans = sum(self.orphans.values())
        failed = sum(self.failed.values())
        return (f"retention sweep: deleted {deleted} (orphans {orphans}); rows marked purged: results "
                f"{self.rows['results']}, inputs {self.rows['inputs']}, checkpoints {self.rows['checkpoints']}; "
                f"pruned {self.idempotency_keys} idempotency keys, {self.upload_rows} upload rows; "
                f"{failed} objects failed; {self.duration_s:.2f} s")


def default_owner() -> str:
    """A lease owner id unique to this process (host, pid, random)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class _Lease:
    """The sweep's hold on the ``retention`` lease row; ``renew`` returns False once another owner took it."""

    def __init__(self, store: JobStore, owner: str, lease_s: float):
        self.store, self.owner, self.lease_s = store, owner, lease_s
        self.epoch: int | None = None

    async def acquire(self) -> bool:
        self.epoch = await self.store.acquire_lease(LEASE_NAME, self.owner, self.lease_s)
        return self.epoch is not None

    async def renew(self) -> bool:
        return await self.store.renew_lease(LEASE_NAME, self.owner, self.epoch, self.lease_s)

    async def release(self, keep_s: float) -> None:
        await self.store.release_lease(LEASE_NAME, self.owner, self.epoch, keep_s)


class _LeaseLost(Exception):
    pass


async def _delete(storage: Storage, keys: list[str]) -> dict[str, str]:
    return await asyncio.to_thread(storage.delete_many, keys) if keys else {}


async def _named(store: JobStore, keys: list[str], read_by_unfinished_only: bool = False) -> set[str]:
    named: set[str] = set()
    for start in range(0, len(keys), NAMED_KEYS_CHUNK):
        named |= await store.named_keys(keys[start:start + NAMED_KEYS_CHUNK], read_by_unfinished_only)
    return named


async def _sweep_rows(store: JobStore, storage: Storage, kind: str, ttl: float, batch: int, lease: _Lease | None,
                      report: SweepReport) -> None:
    """Expired rows of one kind, batch by batch: delete their objects, then purge the rows. A row is purged even
    when one of its objects could not be deleted: that object is then an orphan, and the listing pass tries it
    again at every sweep, while the row moves on (a key that always fails never holds up the rows behind it)."""
    previous: list[str] = []
    while True:
        items: list[ExpiredItem] = await store.expired(kind, ttl, batch)
        ids = [item.request_id for item in items]
        if not items or ids == previous:  # nothing left, or no progress possible in this sweep
            return
        previous = ids
        keys = list(dict.fromkeys(k for item in items for k in item.keys))
        # an expired result that a queued job was given as its input stays until that job ends (then: an orphan)
        read = await _named(store, keys, read_by_unfinished_only=True)
        keys = [key for key in keys if key not in read]
        failed = await _delete(storage, keys)
        report.rows[kind] += await store.purge(kind, ids, ttl)
        for key in keys:
            counts = report.failed if key in failed else report.objects
            counts[object_kind(key) or ("inputs" if kind == "jobs" else kind)] += 1
        if failed:
            logger.warning("retention: %d of %d %s objects could not be deleted (left to the orphan pass), e.g. "
                           "%s: %s", len(failed), len(keys), kind, *next(iter(failed.items())))
        if lease is not None and not await lease.renew():
            raise _LeaseLost


async def _sweep_orphans(store: JobStore, storage: Storage, kind: ObjectKind, cutoff: float, batch: int,
                         lease: _Lease | None, report: SweepReport) -> None:
    """List ``<kind>/`` for objects modified before ``cutoff``, ``batch`` at a time; delete those no row names."""
    listing: Iterator[ObjectInfo] = storage.list_objects(f"{kind}/", modified_before=cutoff)
    while True:
        found = await asyncio.to_thread(lambda: list(itertools.islice(listing, batch)))
        if not found:
            return
        report.listed += len(found)
        keys = [info.key for info in found]
        named = await _named(store, keys)
        orphans = [key for key in keys if key not in named]
        failed = await _delete(storage, orphans)
        report.failed[kind] += len(failed)
        report.objects[kind] += len(orphans) - len(failed)
        report.orphans[kind] += len(orphans) - len(failed)
        if failed:
            logger.warning("retention: %d orphaned %s objects could not be deleted, e.g. %s: %s", len(failed),
                           kind, *next(iter(failed.items())))
        if lease is not None and not await lease.renew():
            raise _LeaseLost


async def _prune(prune: Callable[[int], Awaitable[int]], batch: int, lease: _Lease | None) -> int:
    """Call ``prune(batch)`` until a batch comes back short; returns the rows pruned."""
    total = 0
    while True:
        pruned = await prune(batch)
        total += pruned
        if pruned < batch:
            return total
        if lease is not None and not await lease.renew():
            raise _LeaseLost


async def sweep_once(store: JobStore, storage: Storage, retention: RetentionConfig, now: float | None = None, *,
                     owner: str | None = None, batch_size: int = DEFAULT_BATCH, lease_s: float = DEFAULT_LEASE_S,
                     hold_s: float = 0.0, use_lease: bool = True) -> SweepReport:
    """One sweep (see the module docstring). ``now``: the epoch time listed objects are aged against (default:
    this process's clock; rows always age by the database's). ``hold_s``: keep the lease this long after a
    completed sweep, so no other process sweeps before then. ``use_lease=False`` skips the lease (tests of
    overlapping sweeps). Storage calls run in threads; database calls in the store's pool."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    started = time.monotonic()
    now = time.time() if now is None else now
    report = SweepReport()
    lease = _Lease(store, owner or default_owner(), lease_s) if use_lease else None
    if lease is not None and not await lease.acquire():
        holder = await store.lease_holder(LEASE_NAME)
        return SweepReport(swept=False, lease_holder=holder["owner"] if holder else None)
    completed = False
    try:
        for kind in ROW_KINDS:
            await _sweep_rows(store, storage, kind, retention.ttl(kind), batch_size, lease, report)
        for kind in ORPHAN_KINDS:
            await _sweep_orphans(store, storage, kind, now - retention.ttl(kind), batch_size, lease, report)
        report.rate_buckets = await store.prune_rate_buckets()
        report.idempotency_keys = await _prune(store.prune_idempotency_keys, batch_size, lease)
        report.upload_rows = await _prune(store.prune_upload_usage, batch_size, lease)
        completed = True
    except _LeaseLost:
        report.lease_lost = True
        logger.warning("retention: the sweep lease was taken over by another process; this sweep stops")
    finally:
        report.duration_s = time.monotonic() - started
        if lease is not None and not report.lease_lost:
            with contextlib.suppress(Exception):  # an unreleased lease only expires later
                await lease.release(hold_s if completed else 0.0)
    return report


ReportHook = Callable[[SweepReport], None]


class RetentionSweeper:
    """Runs :func:`sweep_once` every ``sweep_interval_s`` in the background of an async replica.

    Start ``loop`` (a :class:`deployments.runtime.background.BackgroundLoop`) from a method running on the replica's
    event loop (the Orchestrator's constructor does, and its ``check_health`` restarts it if it ever died). Every replica of every
    application may run one: the lease lets one sweep per interval through. ``on_report`` receives each report
    of a sweep that ran (e.g. :func:`deployments.runtime.metrics.record_retention`). Errors are logged and the sweep is
    tried again at the next interval.
    """

    def __init__(self, store: JobStore, storage: Storage, retention: RetentionConfig, *, owner: str | None = None,
                 on_report: ReportHook | None = None, batch_size: int = DEFAULT_BATCH,
                 lease_s: float = DEFAULT_LEASE_S):
        self.store, self.storage, self.retention = store, storage, retention
        self.owner = owner or default_owner()
        self.on_report, self.batch_size, self.lease_s = on_report, batch_size, lease_s
        self.last_report: SweepReport | None = None
        self.sweeps = 0  # sweeps that ran here (not skipped)
        self.loop = BackgroundLoop(f"retention-sweeper-{self.owner}", self._sweep_loop)

    async def sweep(self) -> SweepReport:
        """One sweep now (taking the lease like the loop does) and its report."""
        interval = self.retention.sweep_interval_s
        report = await sweep_once(self.store, self.storage, self.retention, owner=self.owner,
                                  batch_size=self.batch_size, lease_s=self.lease_s,
                                  hold_s=HOLD_FRACTION * interval)
        if report.swept:
            self.sweeps += 1
            self.last_report = report
            if any(report.deleted().values()) or any(report.failed.values()) or report.lease_lost:
                logger.info(report.summary())
            if self.on_report is not None:
                self.on_report(report)
        return report

    async def _sweep_loop(self) -> None:
        interval = self.retention.sweep_interval_s
        # replicas start together: spread their first attempts so one of them finds the lease free first
        await asyncio.sleep(random.uniform(0, min(interval, 30.0) * 0.2))
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the database or storage is down: log, try again next interval
                logger.exception("retention sweep failed; retrying in %.0f s", interval)
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))
