"""Job state in a database (SQLite embedded, PostgreSQL for clusters): queue, leases, fencing, webhooks, retention.

No Ray in here: the Gateway, dispatchers and the Orchestrator all use one :class:`JobStore` (async; every call
runs in the store's thread pool) or :class:`SyncJobStore` (the same methods, blocking).

Opening
-------
``store = make_job_store(args.jobs, default_sqlite_path=<local storage root>/jobs.sqlite3, limits=JobLimits(...))``
opens the database and applies the schema migrations it lacks (blocking, once, at start: call it from a replica's
``__init__``). ``args.jobs`` is a :data:`JobsConfig` (``{kind: sqlite, path?}`` or ``{kind: postgres, dsn_env:
STABLE_AVATAR_JOBS_DSN, dsn_file?}``; the DSN never comes from YAML). ``JobLimits`` from ``AppArgs``:
``max_queue_length``, ``max_queued_per_owner`` (auth.max_queued_per_key), ``max_running_per_owner``,
``rate_per_s`` (auth.submit_rate_per_minute / 60), ``rate_burst`` (auth.submit_burst), ``max_attempts``
(job_attempts), ``max_log_lines``. Every time the store reads or writes is the database's clock, epoch seconds. Errors: ``LimitError`` subclasses
(429), ``FencedError``, ``ValueError`` for bad arguments (an input over 64 KiB of JSON: it must hold references),
driver errors (``sqlite3.OperationalError``, ``psycopg.OperationalError``: answer 503) pass through.

Gateway (every read is owner-scoped: another owner's job is ``None`` / ``NOT_FOUND``, i.e. 404)
-----------------------------------------------------------------------------------------------
- ``submit(app_id=, input=, seed=, owner=, priority=, webhook_url=, start_timeout_s=, max_queue_length=,
  input_keys=, request_id=)`` -> ``Submitted(request_id, queue_position)``; the row is committed first. ``input``
  holds references only: write ``data:`` URIs to storage first and pass the keys in the input and in
  ``input_keys`` (retention deletes them); ``request_id`` (from ``new_request_id()``, server-issued) lets the
  caller name those objects after the job before the row exists. Raises ``QueueFullError`` /
  ``KeyQueueCapError`` / ``RateLimitedError`` (``retry_after_s``), all ``LimitError`` (429) with a ``message``.
- ``create_sync(app_id=, input=, seed=, runner_id=, lease_s=, owner=, input_keys=, request_id=)`` -> ``ClaimedJob``
  (epoch 1): the sync route's row, already running under the caller's lease; ``KeyRunningCapError`` when the key
  is at its running cap. Heartbeat it like any job; if the lease expires it is failed, never re-queued.
- ``status(request_id, owner, logs_since=None)`` -> ``JobSnapshot(job, position, logs)`` in one read: a status
  poll or one SSE tick (pass the previous ``logs.cursor`` as ``logs_since``; lines are numbered per job, 1..,
  ``LogLine`` is ``jobs.LogEntry`` plus ``line``). ``JobView`` replaces ``JobRecord`` for ``status_body``: same
  status/stage/progress/error/result/inference_time, no input and no logs (take them from ``snapshot.logs``).
  Also ``get``, ``position`` (an indexed range count), ``logs``, ``queue_length``, ``queued_count``,
  ``running_count``.
- ``cancel(request_id, owner)`` -> ``CANCELLATION_REQUESTED`` (queued: finished as cancelled now; running: a flag
  the runner sees) | ``ALREADY_COMPLETED`` | ``NOT_FOUND``.
- ``take_token(owner)``: the per-key rate limit for other routes (a token bucket row per key in the database,
  shared by every Gateway replica). ``JobView.result_purged``: retention deleted the result's objects (answer
  410 with a clear detail); it is never set for a job that had none (a failed job answers its error).

Dispatcher / runner (fenced by ``(request_id, epoch)``)
-------------------------------------------------------
- ``claim(runner_id, lease_s, max_running_total=None)`` -> ``ClaimedJob | None``: priority then FIFO, skipping
  keys at their running cap; also re-queues expired leases (the job resumes from ``checkpoint_key``/``_step``),
  fails expired sync jobs, jobs out of attempts and jobs past their start deadline. Poll it (e.g. every 0.2-1 s
  when idle; there is no LISTEN/NOTIFY wake-up); ``expire_leases`` / ``expire_start_deadlines`` (both at once:
  ``maintain``) do the maintenance part alone. ``ClaimedJob`` carries the input, seed, owner, epoch and the checkpoint to resume.
- While running: ``heartbeat(id, epoch, lease_s)`` -> cancel_requested (renew well before ``lease_s``, e.g. every
  ``lease_s / 3``); ``report(id, epoch, stage=, progress=, message=, lease_s=)``; ``log(id, epoch, message)``;
  ``record_checkpoint(id, epoch, key, step)`` -> the previous key to delete; ``complete(id, epoch, result=,
  result_keys=)`` or ``complete(id, epoch, error=JobError)``; ``release(id, epoch, reason)`` to hand it back.
  Any of them raises ``FencedError`` once this epoch no longer holds the lease: stop, and delete what you wrote.
- Object keys: include the epoch in result and checkpoint keys (``results/<id>/e<epoch>/output.mp4``,
  ``checkpoints/<id>/e<epoch>/latents.pt``) so two runners of one job never overwrite each other's objects;
  write the object, then ``record_checkpoint``/``complete``; on ``FencedError`` the loser deletes its own object.
  Exactly one ``complete`` wins, so each job runs to completion once with any number of dispatchers and
  applications sharing the database.

Webhooks (an outbox row is written in the transaction that finishes a job with a ``webhook_url``)
-------------------------------------------------------------------------------------------------
``claim_webhooks(worker_id, lease_s, limit)`` -> ``WebhookDelivery(request_id, owner, url, attempt)`` list (no
one else gets them while leased; build the payload from ``get(request_id, owner)``); then
``webhook_delivered(id, attempt, message=)`` or ``webhook_failed(id, attempt, error, retry_in_s=None|s)``; a
lease that runs out makes the delivery due again (its worker died). ``webhook_state(id)`` for status and tests.

Service-wide values
-------------------
``ping()`` (readiness), ``shared_secret(name)`` (created once with insert-if-absent: the URL signing secret when
none is configured, the same in every process on the database).

Retention (bounded batches; objects first, rows after)
------------------------------------------------------
``expired(kind, older_than_s, limit)`` -> ``ExpiredItem(request_id, keys)`` for kind ``results`` | ``inputs`` |
``checkpoints`` (any finished job still naming one, failed and cancelled included) | ``jobs`` (all keys still
owned); delete the keys from storage, then ``purge(kind, ids, older_than_s)`` (marks purged, or deletes rows with
their logs and webhook). ``prune_rate_buckets()`` drops idle buckets. Logs are bounded per job on insert.
"""

from __future__ import annotations

from pathlib import Path

from deployments.jobstore.config import (
    DEFAULT_DSN_ENV,
    DEFAULT_SQLITE_NAME,
    JobsConfig,
    PostgresJobsConfig,
    SqliteJobsConfig,
)
from deployments.jobstore.core import SyncJobStore, new_request_id
from deployments.jobstore.errors import (
    FencedError,
    JobStoreError,
    KeyQueueCapError,
    KeyRunningCapError,
    LimitError,
    MigrationError,
    QueueFullError,
    RateLimitedError,
)
from deployments.jobstore.models import (
    CancelResult,
    ClaimedJob,
    ExpiredItem,
    JobLimits,
    JobSnapshot,
    JobView,
    LogLine,
    LogPage,
    RetentionKind,
    Submitted,
    WebhookDelivery,
    cancelled_error,
    runner_lost_error,
    start_timeout_error,
)
from deployments.jobstore.store import JobStore

__all__ = [
    "DEFAULT_DSN_ENV", "DEFAULT_SQLITE_NAME", "CancelResult", "ClaimedJob", "ExpiredItem", "FencedError",
    "JobLimits", "JobSnapshot", "JobStore", "JobStoreError", "JobView", "JobsConfig", "KeyQueueCapError",
    "KeyRunningCapError", "LimitError", "LogLine", "LogPage", "MigrationError", "PostgresJobsConfig",
    "QueueFullError", "RateLimitedError", "RetentionKind", "SqliteJobsConfig", "Submitted", "SyncJobStore",
    "WebhookDelivery", "cancelled_error", "make_job_store", "make_sync_job_store", "new_request_id",
    "runner_lost_error", "start_timeout_error",
]


def make_sync_job_store(config: SqliteJobsConfig | PostgresJobsConfig | None, default_sqlite_path: Path,
                        limits: JobLimits | None = None) -> SyncJobStore:
    """Open the configured database (SQLite at ``config.path or default_sqlite_path`` when no config is given)
    and apply its migrations."""
    config = config or SqliteJobsConfig()
    if isinstance(config, SqliteJobsConfig):
        from deployments.jobstore.sqlite import SqliteBackend

        backend = SqliteBackend(config.path or Path(default_sqlite_path), config.busy_timeout_s, config.synchronous,
                                config.max_connections)
    else:
        from deployments.jobstore.postgres import PostgresBackend

        backend = PostgresBackend(config.dsn(), config.pool_min_size, config.pool_max_size,
                                  config.connect_timeout_s, config.application_name)
    try:
        return SyncJobStore(backend, limits)
    except BaseException:
        backend.close()
        raise


def make_job_store(config: SqliteJobsConfig | PostgresJobsConfig | None, default_sqlite_path: Path,
                   limits: JobLimits | None = None) -> JobStore:
    """The async store for Ray Serve replicas (blocking while it connects and migrates: call it at start)."""
    return JobStore(make_sync_job_store(config, default_sqlite_path, limits))
