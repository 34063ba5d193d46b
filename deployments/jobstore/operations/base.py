"""What every group of operations shares: the backend, the named queries, the limits, and the two writes many of
them end with (appending log lines, finishing a job)."""

from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from deployments.jobstore.backend import Backend, Cursor
from deployments.jobstore.columns import job_view
from deployments.jobstore.models import AttemptOutcome, ClaimedJob, JobLimits, JobView, outcome_of
from deployments.jobstore.queries import Statements
from deployments.jobstore.shapes import JobError, LogEntry

R = TypeVar("R")
MAX_INPUT_BYTES = 64 * 1024
LOG_LEVELS = frozenset({"INFO", "WARN", "ERROR", "DEBUG", "STDOUT", "STDERR"})
_REQUEST_ID = re.compile(r"[0-9a-f]{32}")
_FINAL_STAGE = {"succeeded": "completed", "failed": "failed", "cancelled": "cancelled"}


def read_only(method: Callable[..., R]) -> Callable[..., R]:
    """A read whose pooled connection turned out dropped (a database restart or failover) runs once more on a
    fresh connection: reads are idempotent. Writes are never retried (a lost COMMIT reply is ambiguous)."""

    @functools.wraps(method)
    def run(self: StoreBase, *args: Any, **kwargs: Any) -> R:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            if not self.backend.is_disconnect(exc):
                raise
            return method(self, *args, **kwargs)

    return run


def check_input(input: dict[str, Any]) -> None:
    """Rows hold references: a multi-megabyte ``data:`` URI in the input is a caller bug, refused here."""
    size = len(json.dumps(input, separators=(",", ":")))
    if size > MAX_INPUT_BYTES:
        raise ValueError(f"the job input is {size} bytes of JSON (limit {MAX_INPUT_BYTES}): it must hold references "
                         "(URLs, storage keys); write data: URIs to storage first")


def check_lease(lease_s: float) -> None:
    if not lease_s > 0:
        raise ValueError(f"lease_s must be a positive number of seconds, got {lease_s!r}")


def check_timeout(timeout_s: float) -> None:
    if not timeout_s >= 0:
        raise ValueError(f"timeout_s must be a non-negative number of seconds, got {timeout_s!r}")


def new_request_id() -> str:
    """A server-issued request id (uuid4 hex): the only kind of id that ever keys job state."""
    return uuid.uuid4().hex


def checked_request_id(given: str | None) -> str:
    """``given`` (an id the service issued before creating the row, e.g. to name the input objects it wrote
    first) or a fresh one; anything but 32 lowercase hex digits is refused."""
    if given is None:
        return new_request_id()
    if not isinstance(given, str) or not _REQUEST_ID.fullmatch(given):
        raise ValueError(f"request_id must be 32 lowercase hex digits (new_request_id()), got {given!r}")
    return given


def log_entry(message: str, level: str = "INFO") -> LogEntry:
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {sorted(LOG_LEVELS)}, got {level!r}")
    return LogEntry(message=message, level=level)  # type: ignore[arg-type]


class StoreBase:
    """The state every operation uses. Thread-safe: each call takes its own pooled connection."""

    def __init__(self, backend: Backend, limits: JobLimits | None = None, migrate: bool = True):
        self.backend = backend
        self.limits = limits or JobLimits()
        self.q = Statements(backend.name)
        self.migrations_applied: list[int] = backend.migrate() if migrate else []

    def close(self) -> None:
        self.backend.close()

    def _view(self, row: dict[str, Any]) -> JobView:
        return job_view(row, self.backend.json_out)

    def _append_logs(self, cur: Cursor, request_id: str, entries: Sequence[LogEntry], last_line: int | None = None
                     ) -> int:
        """Insert ``entries`` as the job's next lines (their ``timestamp`` is the database's clock) and trim what
        fell out of the per-job bound; returns the last line number, 0 if the job is gone. ``last_line``: the
        caller already took the line numbers in its own UPDATE of the job (one round trip less)."""
        if not entries:
            return last_line or 0
        if last_line is None:
            row = self.q.one(cur, "take_log_lines", request_id=request_id, lines=len(entries))
            if row is None:
                return 0
            last_line = int(row["log_seq"])
        first = last_line - len(entries) + 1
        self.q.many(cur, "insert_log_line", [
            {"request_id": request_id, "line": first + i, "level": e.level, "source": e.source, "message": e.message}
            for i, e in enumerate(entries)])
        if last_line > self.limits.max_log_lines:
            self.q.run(cur, "trim_logs", request_id=request_id, through=last_line - self.limits.max_log_lines)
        return last_line

    def _log(self, cur: Cursor, request_id: str, message: str, level: str = "INFO", line: int | None = None) -> int:
        return self._append_logs(cur, request_id, [log_entry(message, level)], line)

    def _finish(self, cur: Cursor, request_id: str, epoch: int | None, expect_status: str,
                result: dict[str, Any] | None = None, result_keys: Sequence[str] = (),
                error: JobError | None = None, dead_letter: bool = False) -> JobView | None:
        """COMPLETED with a result or an error, if still ``expect_status`` (and ``epoch``); owes the webhook.
        ``dead_letter``: it failed because it ran out of attempts (an operator may re-queue it)."""
        outcome = outcome_of(error)
        j = self.backend.json_in
        row = self.q.one(cur, "finish_job", request_id=request_id, expect_status=expect_status, epoch=epoch,
                         outcome=outcome, stage=_FINAL_STAGE[outcome], progress=1.0 if error is None else None,
                         result=j(result), result_keys=j(list(result_keys)), result_purged=not result_keys,
                         error=None if error is None else j(error.model_dump()), dead_letter=dead_letter)
        if row is None:
            return None
        job = self._view(row)
        if error is None:
            self._log(cur, request_id, f"completed in {job.inference_time or 0.0:.1f} s", line=job.log_count)
        elif outcome == "cancelled":
            self._log(cur, request_id, "cancelled", "WARN", line=job.log_count)
        else:
            self._log(cur, request_id, f"failed: {error.message}", "ERROR", line=job.log_count)
        if job.webhook_url:
            self.q.run(cur, "owe_webhook", request_id=request_id, url=job.webhook_url)
        return job

    def _announce(self, cur: Cursor, model_fingerprint: str) -> None:
        """A job of ``model_fingerprint`` is claimable once this transaction commits: wake its idle runners."""
        self.q.run(cur, "announce_queued", model_fingerprint=model_fingerprint)

    def _begin_attempt(self, cur: Cursor, job: ClaimedJob) -> None:
        """Record the claim that just started ``job`` (bounded per job: the oldest records are trimmed)."""
        self.q.run(cur, "insert_attempt", request_id=job.request_id, epoch=job.epoch, attempt=job.attempts,
                   runner=job.lease_owner)
        if job.epoch > self.limits.max_attempt_history:
            self.q.run(cur, "trim_attempts", request_id=job.request_id,
                       through=job.epoch - self.limits.max_attempt_history)

    def _end_attempt(self, cur: Cursor, request_id: str, epoch: int, outcome: AttemptOutcome,
                     error_class: str | None = None, message: str | None = None) -> None:
        self.q.run(cur, "end_attempt", request_id=request_id, epoch=epoch, outcome=outcome, error_class=error_class,
                   message=message)
