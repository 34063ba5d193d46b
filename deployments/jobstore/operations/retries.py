"""Retries after infrastructure faults, with backoff and a bounded number of attempts; the dead letters (jobs that
ran out of attempts) an operator can list and re-queue."""

from __future__ import annotations

import re

from deployments.jobstore.errors import NotDeadLetteredError
from deployments.jobstore.models import JobView, attempts_exhausted_error, cancelled_error
from deployments.jobstore.operations.base import read_only
from deployments.jobstore.operations.claims import ClaimOps
from deployments.jobstore.shapes import JobError

MAX_BACKOFF_S = 24 * 3600.0
MAX_DEAD_LETTERS = 1000  # per listing
_ERROR_CLASS = re.compile(r"[a-z][a-z0-9_]{0,63}")


class RetryOps(ClaimOps):
    def retry(self, request_id: str, epoch: int, *, error: JobError, error_class: str,
              backoff_s: float = 0.0) -> JobView:
        """Let go of the job after an infrastructure fault (a database or storage error, a replica's death, a
        timeout, a stall): this attempt ends as ``retried`` with ``error_class`` and ``error.message``, and the
        job is queued again in its old place, claimable after ``backoff_s`` seconds, to resume from its checkpoint
        on any replica. A job that has used its ``max_attempts`` is failed instead with ``error`` (a dead letter:
        :meth:`dead_letters`, :meth:`requeue`); a cancel-requested one is cancelled; a sync job is failed (its
        caller is waiting on this attempt). Raises FencedError once this epoch no longer holds the lease."""
        if not _ERROR_CLASS.fullmatch(error_class):
            raise ValueError(f"error_class must be a short snake_case word (database, storage, timeout, ...), "
                             f"got {error_class!r}")
        if not 0 <= backoff_s <= MAX_BACKOFF_S:
            raise ValueError(f"backoff_s must be between 0 and {MAX_BACKOFF_S:.0f} seconds, got {backoff_s!r}")
        with self.backend.write() as cur:
            row = self._lock_running(cur, request_id, epoch, "retry")
            attempts, runner = int(row["attempts"]), row["lease_owner"]
            self._end_attempt(cur, request_id, epoch, "retried", error_class, error.message)
            failed = f"attempt {attempts} on {runner} failed ({error_class}: {error.message})"
            if row["cancel_requested"]:
                job = self._finish(cur, request_id, epoch, "IN_PROGRESS", error=cancelled_error())
            elif row["kind"] == "sync":
                job = self._finish(cur, request_id, epoch, "IN_PROGRESS", error=error)
            elif attempts >= int(row["max_attempts"]):
                self._log(cur, request_id, f"{failed}; no attempts left", "ERROR")
                job = self._finish(cur, request_id, epoch, "IN_PROGRESS",
                                   error=attempts_exhausted_error(error, attempts), dead_letter=True)
            else:
                job = self._requeue_held(cur, request_id, refund=0, backoff_s=backoff_s)
                if backoff_s == 0:  # claimable at once (after a backoff, polling finds it)
                    self._announce(cur, job.model_fingerprint)
                self._log(cur, request_id, f"{failed}; queued again in {backoff_s:.1f} s, it resumes from its last "
                                           "checkpoint", "WARN")
            assert job is not None
            return job

    @read_only
    def dead_letters(self, limit: int = 100) -> list[JobView]:
        """Jobs failed because they ran out of attempts, the latest first (operators; any owner)."""
        with self.backend.read() as cur:
            rows = self.q.all(cur, "dead_letters", limit=max(1, min(int(limit), MAX_DEAD_LETTERS)))
            return [self._view(r) for r in rows]

    def requeue(self, request_id: str, model_fingerprint: str | None = None) -> JobView:
        """Put a dead-lettered job back in the queue (operators): its old place, a fresh allowance of attempts,
        resumed from its checkpoint if retention has not swept it, its webhook owed again when it finishes;
        ``model_fingerprint`` moves it to another application (it then starts over). Raises NotDeadLetteredError
        for any other job, or one whose inputs retention already deleted."""
        with self.backend.write() as cur:
            row = self.q.one(cur, "requeue_dead_letter", request_id=request_id, model_fingerprint=model_fingerprint)
            if row is None:
                raise NotDeadLetteredError(request_id)
            self.q.run(cur, "delete_webhooks_of", ids=self.backend.list_in([request_id]))
            self._log(cur, request_id, "re-queued by an operator after running out of attempts", "WARN")
            job = self._view(row)
            self._announce(cur, job.model_fingerprint)
            return job

    def retarget(self, from_fingerprint: str, to_fingerprint: str) -> int:
        """Move every queued job of ``from_fingerprint`` (an application that was removed before it drained its
        queue) onto ``to_fingerprint`` (operators); they start over there. Returns how many moved."""
        with self.backend.write() as cur:
            moved = self.q.all(cur, "retarget_queued", from_fingerprint=from_fingerprint,
                               to_fingerprint=to_fingerprint)
            for row in moved:
                self._log(cur, row["request_id"], "moved by an operator to another model; it starts over", "WARN")
            if moved:
                self._announce(cur, to_fingerprint)
            return len(moved)
