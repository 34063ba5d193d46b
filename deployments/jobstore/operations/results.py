"""How a run ends: its result or error, and the checkpoints it records on the way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deployments.jobstore.errors import FencedError
from deployments.jobstore.models import JobView
from deployments.jobstore.operations.base import read_only
from deployments.jobstore.operations.claims import ClaimOps
from deployments.jobstore.shapes import JobError

COMPLETE_OUTCOMES = frozenset({"succeeded", "failed", "cancelled"})  # the attempt outcomes only complete writes


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

    @read_only
    def completion(self, request_id: str, epoch: int) -> JobView | None:
        """Whether this epoch's ``complete`` committed, for a runner whose ``complete`` raised a driver error (the
        COMMIT may have landed with its reply lost): the job as that complete left it, or None when it did not
        land (the job still runs under this epoch: complete again; or the lease was lost and another runner or
        the store finished it: the row does not name your result objects). Never delete a result object before
        this answers None: a key a row names is deleted by retention alone."""
        with self.backend.read() as cur:
            row = self.q.one(cur, "completion", request_id=request_id, epoch=epoch)
        if row is None or row["attempt_outcome"] not in COMPLETE_OUTCOMES:
            return None
        return self._view(row)

    def record_checkpoint(self, request_id: str, epoch: int, key: str, step: int) -> str | None:
        """Name ``key`` (written first, one key per write: ``checkpoints/<id>/e<epoch>/s<step>...``) as the job's
        checkpoint, stamped with its model fingerprint; returns the key it replaced, which no row names any more
        once this returns, so the caller may delete that object (None: nothing to prune). Refused with
        FencedError unless the job is running under this epoch's lease: a stale runner's object is never named,
        and it deletes only its own. After a driver error (an ambiguous COMMIT) delete neither key: ask
        :meth:`named_keys`."""
        if not key or not isinstance(step, int) or step < 0:
            raise ValueError(f"a checkpoint needs a storage key and a step >= 0, got {key!r} at {step!r}")
        with self.backend.write() as cur:
            row = self._lock_running(cur, request_id, epoch, "checkpoint")
            self.q.run(cur, "set_checkpoint", request_id=request_id, key=key, step=step)
            previous = row["checkpoint_key"]
            return previous if previous != key else None
