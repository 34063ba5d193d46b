"""Job state in a database (SQLite embedded, PostgreSQL for clusters): the queue, leases and fencing, logs, results
and checkpoints, the webhook outbox, retention queries and per-key limits. No Ray in here.

Open one with :func:`make_job_store` (async, for Serve replicas) or :func:`make_sync_job_store`; ``docs/jobs.md``
explains the model and lists the operations each caller uses.
"""

from deployments.jobstore.config import (
    DEFAULT_DSN_ENV,
    DEFAULT_SQLITE_NAME,
    JobsConfig,
    PostgresJobsConfig,
    SqliteJobsConfig,
)
from deployments.jobstore.errors import (
    AlreadySubmittedError,
    FencedError,
    IdempotencyKeyReusedError,
    JobStoreError,
    KeyQueueCapError,
    KeyRunningCapError,
    LimitError,
    MigrationError,
    NotDeadLetteredError,
    QueueFullError,
    RateLimitedError,
    UploadQuotaError,
)
from deployments.jobstore.factory import make_job_store, make_sync_job_store
from deployments.jobstore.models import (
    AttemptRecord,
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
    UploadUsage,
    WebhookDelivery,
    attempts_exhausted_error,
    cancelled_error,
    runner_lost_error,
    start_timeout_error,
)
from deployments.jobstore.operations.base import new_request_id
from deployments.jobstore.shapes import JobError, JobStatus, LogEntry, Priority
from deployments.jobstore.store import JobStore, SyncJobStore

__all__ = [
    "AlreadySubmittedError", "AttemptRecord", "CancelResult", "ClaimedJob", "DEFAULT_DSN_ENV",
    "DEFAULT_SQLITE_NAME", "ExpiredItem", "FencedError", "IdempotencyKeyReusedError", "JobError", "JobLimits",
    "JobSnapshot", "JobStatus", "JobStore", "JobStoreError", "JobView", "JobsConfig", "KeyQueueCapError",
    "KeyRunningCapError", "LimitError", "LogEntry", "LogLine", "LogPage", "MigrationError", "NotDeadLetteredError",
    "PostgresJobsConfig", "Priority", "QueueFullError", "RateLimitedError", "RetentionKind", "SqliteJobsConfig",
    "Submitted", "SyncJobStore", "UploadQuotaError", "UploadUsage", "WebhookDelivery", "attempts_exhausted_error",
    "cancelled_error", "make_job_store", "make_sync_job_store", "new_request_id", "runner_lost_error",
    "start_timeout_error",
]
