"""fal's job vocabulary, shared by the store and the HTTP layer: statuses, priorities, log lines, errors."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

JobStatus = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
Priority = Literal["normal", "low"]
LogLevel = Literal["INFO", "WARN", "ERROR", "DEBUG", "STDOUT", "STDERR"]


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LogEntry(BaseModel):
    """fal's RequestLog shape."""

    message: str
    level: LogLevel = "INFO"
    source: str = "USER"
    timestamp: str = Field(default_factory=now_iso)


class JobError(BaseModel):
    """How a failed job answers its result request: HTTP status, fal ``detail`` and ``error_type``."""

    status_code: int
    detail: Any
    error_type: str | None = None
    message: str  # one line for the status response's ``error`` field
    timeout_type: str | None = None  # "user" for a missed X-Fal-Request-Timeout
