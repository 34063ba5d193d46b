"""Job records and the queue discipline, independent of Ray (unit-testable).

A job is acknowledged only after its record is written to storage; every transition and log line is written
again, so a restarted JobQueue reloads exactly what clients were told. Status reads come from memory.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from deployments.storage import Storage

JobStatus = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
Priority = Literal["normal", "low"]
JOBS_PREFIX = "jobs/"
MAX_LOG_LINES = 500


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LogEntry(BaseModel):
    """fal's RequestLog shape."""

    message: str
    level: Literal["INFO", "WARN", "ERROR", "DEBUG", "STDOUT", "STDERR"] = "INFO"
    source: str = "USER"
    timestamp: str = Field(default_factory=now_iso)


class JobError(BaseModel):
    """How a failed job answers its result request: HTTP status, fal ``detail`` and ``error_type``."""

    status_code: int
    detail: Any
    error_type: str | None = None
    message: str  # one line for the status response's ``error`` field
    timeout_type: str | None = None  # "user" for a missed X-Fal-Request-Timeout


class JobRecord(BaseModel):
    """Everything about one job; this is what is persisted as ``jobs/<id>.json``."""

    request_id: str
    app_id: str
    input: dict[str, Any]
    seed: int
    owner: str = ""  # API-key fingerprint of the submitter ("" when the server runs open)
    status: JobStatus = "IN_QUEUE"
    priority: Priority = "normal"
    sequence: int = 0  # submission order (FIFO within a priority)
    created_at: float = Field(default_factory=time.time)
    start_deadline: float | None = None  # X-Fal-Request-Timeout: must start before this (epoch seconds)
    started_at: float | None = None
    completed_at: float | None = None
    webhook_url: str | None = None
    webhook_delivered: bool = False
    webhook_done: bool = False  # delivered, or given up after the last attempt
    stage: str = "queued"
    progress: float = 0.0
    attempts: int = 0
    cancel_requested: bool = False
    logs: list[LogEntry] = Field(default_factory=list)
    result: dict[str, Any] | None = None  # the output, with the video as a storage key (URL made on read)
    error: JobError | None = None

    def log(self, message: str, level: str = "INFO") -> LogEntry:
        entry = LogEntry(message=message, level=level)  # type: ignore[arg-type]
        self.logs.append(entry)
        del self.logs[:-MAX_LOG_LINES]
        return entry

    @property
    def finished(self) -> bool:
        return self.status == "COMPLETED"

    @property
    def inference_time(self) -> float | None:
        if self.started_at is None or self.completed_at is None:
            return None
        return round(self.completed_at - self.started_at, 3)


def queue_order(job: JobRecord) -> tuple[int, int]:
    """Normal priority before low; first come, first served within a priority."""
    return (0 if job.priority == "normal" else 1, job.sequence)


class JobStore:
    """Durable job records in the storage backend (``jobs/<id>.json``)."""

    def __init__(self, storage: Storage):
        self.storage = storage

    @staticmethod
    def key(request_id: str) -> str:
        return f"{JOBS_PREFIX}{request_id}.json"

    def save(self, job: JobRecord) -> None:
        self.storage.put_bytes(self.key(job.request_id), job.model_dump_json().encode(), "application/json")

    def load_all(self) -> list[JobRecord]:
        jobs = []
        for key in self.storage.list_keys(JOBS_PREFIX):
            if key.endswith(".json"):
                jobs.append(JobRecord.model_validate(json.loads(self.storage.get_bytes(key))))
        return sorted(jobs, key=lambda j: j.sequence)
