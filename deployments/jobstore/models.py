"""The store's boundary models: limits it enforces, and the rows it hands out (no input payload in status rows)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.jobstore.shapes import JobError, JobStatus, LogEntry, Priority

JobKind = Literal["queue", "sync"]
Outcome = Literal["succeeded", "failed", "cancelled"]
CancelResult = Literal["CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND"]
RetentionKind = Literal["results", "inputs", "checkpoints", "jobs"]
# How an attempt ended: the runner's complete (succeeded/failed/cancelled), its retry after an infrastructure
# fault, its release at shutdown, or its lease running out.
AttemptOutcome = Literal["succeeded", "failed", "cancelled", "retried", "released", "lost"]
PRIORITY_RANK: dict[str, int] = {"normal": 0, "low": 1}
PRIORITY_NAME: dict[int, Priority] = {0: "normal", 1: "low"}


class JobLimits(BaseModel):
    """Policy the store enforces inside its transactions (phase B maps ``AppArgs`` onto it)."""

    model_config = ConfigDict(extra="forbid")

    max_queue_length: int = Field(1000, ge=1, description="queued jobs in total (server limit)")
    max_queued_per_owner: int = Field(50, ge=1, description="queued jobs one API key may have")
    max_running_per_owner: int | None = Field(None, ge=1, description="running jobs (queue + sync) per key")
    rate_per_s: float = Field(1.0, gt=0, description="sustained submits per key per second (token bucket)")
    rate_burst: int = Field(10, ge=1, description="submits a key may make at once before the rate applies")
    max_attempts: int = Field(3, ge=1, le=100, description="claims of a queued job before it is failed")
    max_log_lines: int = Field(500, ge=1, le=100_000, description="log lines kept per job (oldest trimmed)")
    idempotency_ttl_s: float = Field(24 * 3600.0, gt=0, le=7 * 24 * 3600.0,
                                     description="how long an Idempotency-Key answers with the job it created")
    upload_quota_bytes: int | None = Field(None, ge=1, description="bytes of uploads one API key may hold in "
                                           "storage at once (None: no quota)")
    max_uploads_per_owner: int | None = Field(None, ge=1, description="uploads one API key may hold in storage at "
                                              "once (None: no cap)")
    upload_hold_s: float = Field(6 * 3600.0, gt=0, description="how long a reservation counts before it is "
                                 "settled (the upload of a Gateway that died mid-way frees itself then)")
    upload_ttl_s: float = Field(24 * 3600.0, gt=0, description="how long an upload is kept (retention's uploads_s): "
                                "its bytes count against the quota until then")
    max_attempt_history: int = Field(100, ge=1, le=10_000, description="attempt records kept per job (oldest "
                                     "trimmed; attempts refunded by a release can exceed max_attempts)")


def iso_timestamp(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JobView(BaseModel):
    """A job as status, result and cancel routes need it: everything but the input payload.

    Times are epoch seconds from the database's clock. ``result_purged``: the result objects were removed by
    retention (answer 410). ``epoch`` counts claims; it is the fencing token of the current lease.
    """

    request_id: str
    app_id: str
    owner: str
    kind: JobKind
    status: JobStatus
    priority: Priority
    created_at: float
    start_deadline: float | None = None
    started_at: float | None = None
    completed_at: float | None = None
    stage: str
    progress: float
    attempts: int
    max_attempts: int
    epoch: int
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    cancel_requested: bool
    checkpoint_step: int | None = None
    webhook_url: str | None = None
    result: dict[str, Any] | None = None
    result_keys: list[str] = Field(default_factory=list)
    result_purged: bool = False
    error: JobError | None = None
    outcome: Outcome | None = None
    log_count: int = 0  # lines ever written (line numbers run 1..log_count; older ones may be trimmed)
    not_before: float | None = None  # a retried job waits in the queue until then (its backoff)
    dead_letter: bool = False  # failed because it ran out of attempts: an operator may re-queue it
    model_fingerprint: str = ""  # the application (weights and settings) it was submitted to and runs on

    @property
    def finished(self) -> bool:
        return self.status == "COMPLETED"

    @property
    def inference_time(self) -> float | None:
        if self.started_at is None or self.completed_at is None:
            return None
        return round(self.completed_at - self.started_at, 3)


class ClaimedJob(BaseModel):
    """What a runner needs to run (or resume) a job it now holds; ``epoch`` goes with every write it makes."""

    request_id: str
    epoch: int
    kind: JobKind
    owner: str
    app_id: str
    priority: Priority
    input: dict[str, Any]
    seed: int
    attempts: int
    max_attempts: int
    lease_owner: str
    lease_expires_at: float
    created_at: float
    started_at: float
    checkpoint_key: str | None = None  # only a checkpoint written under this job's model fingerprint
    checkpoint_step: int | None = None
    cancel_requested: bool = False
    model_fingerprint: str = ""  # put it in the checkpoints you write; a resume checks it


class Submitted(BaseModel):
    request_id: str
    queue_position: int  # jobs ahead of it in dispatch order (0: next)
    replayed: bool = False  # an earlier submit with the same idempotency key created it; nothing new was queued


class UploadUsage(BaseModel):
    """What one API key's live uploads hold (reserved or stored, not yet deleted by retention)."""

    bytes: int
    uploads: int


class LogLine(LogEntry):
    """A fal ``RequestLog`` with its line number in the job's log (1-based, never reused)."""

    line: int


class LogPage(BaseModel):
    """Lines after ``since``; pass ``cursor`` as the next ``since`` to continue (an SSE stream does)."""

    lines: list[LogLine]
    cursor: int


class AttemptRecord(BaseModel):
    """One claim of a job: where and when it ran, and how it ended (``outcome`` None while it runs)."""

    attempt: int
    epoch: int
    runner: str
    started_at: float
    ended_at: float | None = None
    outcome: AttemptOutcome | None = None
    error_class: str | None = None
    error_message: str | None = None


class JobSnapshot(BaseModel):
    """One status poll: the job, its queue position (0 unless queued) and, when asked, new log lines and the
    attempt history."""

    job: JobView
    position: int
    logs: LogPage | None = None
    attempts: list[AttemptRecord] | None = None


class WebhookDelivery(BaseModel):
    """A webhook the caller now holds a lease to deliver; ``attempt`` is its fencing token."""

    request_id: str
    owner: str  # read the job with it (get(request_id, owner)) to build the payload
    url: str
    attempt: int
    lease_expires_at: float


class ExpiredItem(BaseModel):
    """A job whose objects of one retention kind expired: delete ``keys`` from storage, then ``purge`` it."""

    request_id: str
    keys: list[str]


def cancelled_error() -> JobError:
    return JobError(status_code=499, detail="Request cancelled", error_type="client_cancelled",
                    message="Request cancelled")


def start_timeout_error() -> JobError:
    """fal's answer to a job that missed its ``X-Fal-Request-Timeout`` start deadline."""
    return JobError(status_code=504, detail="Request timed out before it started", error_type="request_timeout",
                    message="Request timed out before it started", timeout_type="user")


def attempts_exhausted_error(error: JobError, attempts: int) -> JobError:
    """The last attempt's infrastructure error, as the answer of a job that ran out of attempts (a dead letter)."""
    return error.model_copy(update={"message": f"{error.message} (gave up after {attempts} attempts)"})


def runner_lost_error(reason: str, attempts: int) -> JobError:
    return JobError(status_code=503, detail=f"{reason} ({attempts} attempts)", error_type="runner_disconnected",
                    message=reason)


def outcome_of(error: JobError | None) -> Outcome:
    if error is None:
        return "succeeded"
    return "cancelled" if error.error_type == "client_cancelled" else "failed"
