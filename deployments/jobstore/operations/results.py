"""How a run ends: its result or error, and the checkpoints it records on the way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deployments.jobstore.errors import FencedError
from deployments.jobstore.models import JobView
from deployments.jobstore.operations.claims import ClaimOps
from deployments.jobstore.shapes import JobError


class ResultOps(ClaimOps):
    def complete(self, request_id: str, epoch: int, *, result: dict[str, Any] | None = None,
                 result_keys: Sequence[str] = (), error: JobError | None = None) -> JobView:
        """Finish the job with ``result`` (its objects named in ``result_keys``) or ``error``; exactly one
        ``complete`` per job can succeed. Raises FencedError for a runner that lost the lease."""
        if (result is None) == (error is None):
            raise ValueError("complete takes exactly one of result and error")
        with self.backend.write() as cur:
            job = self._finish(cur, request_id, epoch, "IN_PROGRESS", result, result_keys, error)
            if job is None:
                raise FencedError(request_id, epoch, "complete")
            assert job.outcome is not None
            self._end_attempt(cur, request_id, epoch, job.outcome, error and error.error_type, error and error.message)
            return job

    def record_checkpoint(self, request_id: str, epoch: int, key: str, step: int) -> str | None:
        """Point the job at its latest checkpoint object; returns the previous key when it differs (the caller
        deletes that object). Write the object first, then record it: a fenced runner's object is never named."""
        with self.backend.write() as cur:
            row = self._lock_running(cur, request_id, epoch, "checkpoint")
            self.q.run(cur, "set_checkpoint", request_id=request_id, key=key, step=step)
            previous = row["checkpoint_key"]
            return previous if previous != key else None
