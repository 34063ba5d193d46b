"""Submitting jobs and reading the queue: what the Gateway calls. Every read is owner-scoped: another owner's job
does not exist (``None`` / ``NOT_FOUND``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deployments.jobstore.backend import Cursor
from deployments.jobstore.columns import claimed_job, to_model
from deployments.jobstore.errors import (
    AlreadySubmittedError,
    KeyQueueCapError,
    KeyRunningCapError,
    QueueFullError,
)
from deployments.jobstore.models import (
    PRIORITY_RANK,
    AttemptRecord,
    CancelResult,
    ClaimedJob,
    JobSnapshot,
    JobView,
    LogLine,
    LogPage,
    Submitted,
    cancelled_error,
    iso_timestamp,
)
from deployments.jobstore.operations.base import (
    StoreBase,
    check_input,
    check_lease,
    checked_request_id,
    read_only,
)
from deployments.jobstore.operations.idempotency import IdempotencyOps, check_idempotency
from deployments.jobstore.operations.limits import LimitOps
from deployments.jobstore.shapes import Priority


class QueueOps(IdempotencyOps, LimitOps, StoreBase):
    def submit(self, *, app_id: str, input: dict[str, Any], seed: int, owner: str = "",
               priority: Priority = "normal", webhook_url: str | None = None, start_timeout_s: float | None = None,
               max_queue_length: int | None = None, input_keys: Sequence[str] = (),
               rate_limited: bool = True, request_id: str | None = None, model_fingerprint: str = "",
               idempotency_key: str | None = None, body_hash: str | None = None) -> Submitted:
        """Queue a job; the row is committed before this returns. Caps are checked before the rate limit, so a
        refused submit costs no token. Raises QueueFullError, KeyQueueCapError or RateLimitedError.
        ``request_id``: an id from :func:`new_request_id` the caller already used (for its input objects).
        ``model_fingerprint``: the application's weights and settings; only claims with the same one take it.
        ``idempotency_key`` with ``body_hash`` (sha256 hex of the request body): within the key's window the same
        key, owner and body return the job the first submit created (``replayed``; no limit is charged, nothing is
        queued: the caller deletes any input objects it wrote for this request); the same key with another body
        raises IdempotencyKeyReusedError (HTTP 422)."""
        if priority not in PRIORITY_RANK:
            raise ValueError(f"priority must be one of {sorted(PRIORITY_RANK)}, got {priority!r}")
        check_input(input)
        check_idempotency(idempotency_key, body_hash)
        rank, request_id = PRIORITY_RANK[priority], checked_request_id(request_id)
        limit = self.limits.max_queue_length
        if max_queue_length is not None:
            limit = min(limit, max_queue_length)
        j = self.backend.json_in
        with self.backend.write() as cur:
            self.backend.lock(cur, "submit")  # queue caps (and idempotency keys) are exact across processes
            if idempotency_key is not None and body_hash is not None:
                earlier = self._earlier_request(cur, owner, idempotency_key, body_hash)
                if earlier is not None:
                    place = self.q.one(cur, "job_place", request_id=earlier, owner=owner)
                    position = 0 if place is None else self._position(cur, place)
                    return Submitted(request_id=earlier, queue_position=position, replayed=True)
                self._remember(cur, owner, idempotency_key, body_hash, request_id)
            # Under the submit lock every queued job has a smaller seq than the one inserted next, so the new
            # job's position is the count of queued jobs of its priority or a more urgent one.
            counts = self.q.one(cur, "submit_counts", owner=owner, priority=rank)
            assert counts is not None
            queued, mine = int(counts["queued"]), int(counts["mine"])
            if queued >= limit:
                raise QueueFullError(f"the queue holds {queued} jobs (limit {limit})")
            if mine >= self.limits.max_queued_per_owner:
                raise KeyQueueCapError(f"this API key already has {mine} queued jobs (limit "
                                       f"{self.limits.max_queued_per_owner})")
            if rate_limited:
                self._rate_limit(cur, owner)
            self.q.run(cur, "insert_queued_job", request_id=request_id, app_id=app_id, owner=owner, priority=rank,
                       input=j(input), input_keys=j(list(input_keys)), seed=seed, webhook_url=webhook_url,
                       start_timeout_s=start_timeout_s, max_attempts=self.limits.max_attempts,
                       inputs_purged=not input_keys, model_fingerprint=model_fingerprint)
            self._log(cur, request_id, f"queued ({priority} priority)", line=1)
            self._announce(cur, model_fingerprint)
            return Submitted(request_id=request_id, queue_position=int(counts["ahead"]))

    def create_sync(self, *, app_id: str, input: dict[str, Any], seed: int, runner_id: str, lease_s: float,
                    owner: str = "", input_keys: Sequence[str] = (), rate_limited: bool = True,
                    request_id: str | None = None, model_fingerprint: str = "", idempotency_key: str | None = None,
                    body_hash: str | None = None) -> ClaimedJob:
        """A sync request's row, created already claimed (IN_PROGRESS, epoch 1, leased to ``runner_id``); it
        counts as a running job of ``owner``. Its lease expiring fails it (never re-queued). Raises
        KeyRunningCapError or RateLimitedError; with an idempotency key (as :meth:`submit`) that already created
        a job, AlreadySubmittedError naming it (wait for that one's result) or IdempotencyKeyReusedError."""
        check_input(input)
        check_idempotency(idempotency_key, body_hash)
        check_lease(lease_s)
        request_id, j = checked_request_id(request_id), self.backend.json_in
        with self.backend.write() as cur:
            if idempotency_key is not None and body_hash is not None:
                self.backend.lock(cur, "submit")  # the lock keyed submits take: one job per key
                earlier = self._earlier_request(cur, owner, idempotency_key, body_hash)
                if earlier is not None:
                    raise AlreadySubmittedError(earlier)
                self._remember(cur, owner, idempotency_key, body_hash, request_id)
            self._check_running_cap(cur, owner)
            if rate_limited:
                self._rate_limit(cur, owner)
            row = self.q.one(cur, "insert_sync_job", request_id=request_id, app_id=app_id, owner=owner,
                             input=j(input), input_keys=j(list(input_keys)), seed=seed, runner_id=runner_id,
                             lease_s=lease_s, inputs_purged=not input_keys, model_fingerprint=model_fingerprint)
            assert row is not None
            self._log(cur, request_id, "started (sync request)", line=1)
            job = claimed_job(row, self.backend.json_out)
            self._begin_attempt(cur, job)
            return job

    def _check_running_cap(self, cur: Cursor, owner: str) -> None:
        cap = self.limits.max_running_per_owner
        if cap is None:
            return
        self.backend.lock(cur, f"owner:{owner}")  # exact per-key count across processes
        running = self.q.count(cur, "running_of_owner", owner=owner)
        if running >= cap:
            raise KeyRunningCapError(f"this API key already has {running} running jobs (limit {cap})")

    # -- reads ---------------------------------------------------------------------------------------------------
    @read_only
    def get(self, request_id: str, owner: str = "") -> JobView | None:
        with self.backend.read() as cur:
            row = self.q.one(cur, "get_job", request_id=request_id, owner=owner)
            return None if row is None else self._view(row)

    @read_only
    def position(self, request_id: str, owner: str | None = None) -> int | None:
        """Jobs ahead of this one in dispatch order (0 when it is not queued); None when unknown."""
        with self.backend.read() as cur:
            row = self.q.one(cur, "job_place", request_id=request_id, owner=owner)
            if row is None:
                return None
            return self._position(cur, row)

    def _position(self, cur: Cursor, row: dict[str, Any]) -> int:
        if row["status"] != "IN_QUEUE":
            return 0
        return self.q.count(cur, "queue_position", priority=int(row["priority"]), seq=int(row["seq"]))

    def _logs(self, cur: Cursor, request_id: str, since: int, limit: int | None) -> LogPage:
        rows = self.q.all(cur, "read_logs", request_id=request_id, since=since,
                          limit=limit or self.limits.max_log_lines)
        lines = [to_model(LogLine, {**r, "timestamp": iso_timestamp(float(r["ts"]))}, self.backend.json_out)
                 for r in rows]
        return LogPage(lines=lines, cursor=lines[-1].line if lines else since)

    @read_only
    def logs(self, request_id: str, owner: str = "", since: int = 0, limit: int | None = None) -> LogPage | None:
        """Log lines numbered above ``since`` (an SSE stream passes the previous page's ``cursor``)."""
        with self.backend.read() as cur:
            if self.q.one(cur, "job_exists", request_id=request_id, owner=owner) is None:
                return None
            return self._logs(cur, request_id, since, limit)

    @read_only
    def status(self, request_id: str, owner: str = "", logs_since: int | None = None,
               with_attempts: bool = False) -> JobSnapshot | None:
        """One status poll in one read: the job, its queue position, and (``logs_since`` given) new log lines,
        (``with_attempts``) its attempt history."""
        with self.backend.read() as cur:
            row = self.q.one(cur, "get_job", request_id=request_id, owner=owner)
            if row is None:
                return None
            logs = None if logs_since is None else self._logs(cur, request_id, logs_since, None)
            attempts = self._attempts(cur, request_id) if with_attempts else None
            return JobSnapshot(job=self._view(row), position=self._position(cur, row), logs=logs, attempts=attempts)

    def _attempts(self, cur: Cursor, request_id: str) -> list[AttemptRecord]:
        return [to_model(AttemptRecord, r, self.backend.json_out)
                for r in self.q.all(cur, "read_attempts", request_id=request_id)]

    @read_only
    def attempts(self, request_id: str, owner: str = "") -> list[AttemptRecord] | None:
        """Every recorded claim of the job, oldest first: where it ran, when, and how it ended."""
        with self.backend.read() as cur:
            if self.q.one(cur, "job_exists", request_id=request_id, owner=owner) is None:
                return None
            return self._attempts(cur, request_id)

    @read_only
    def queue_length(self) -> int:
        with self.backend.read() as cur:
            return self.q.count(cur, "queued_total")

    @read_only
    def queued_count(self, owner: str | None = None) -> int:
        """Queued jobs, of ``owner`` alone when given (the Gateway checks the queue caps before it reads a body)."""
        if owner is None:
            return self.queue_length()
        with self.backend.read() as cur:
            return self.q.count(cur, "queued_of_owner", owner=owner)

    @read_only
    def running_count(self, owner: str | None = None) -> int:
        with self.backend.read() as cur:
            if owner is None:
                return self.q.count(cur, "running_total")
            return self.q.count(cur, "running_of_owner", owner=owner)

    # -- cancel --------------------------------------------------------------------------------------------------
    def cancel(self, request_id: str, owner: str = "") -> CancelResult:
        """A queued job is finished as cancelled at once; a running one gets ``cancel_requested``, which its
        runner sees on its next heartbeat or write (and which a lease expiry turns into a cancellation)."""
        with self.backend.write() as cur:
            row = self.q.one(cur, "lock_job_of_owner", request_id=request_id, owner=owner)
            if row is None:
                return "NOT_FOUND"
            if row["status"] == "COMPLETED":
                return "ALREADY_COMPLETED"
            if row["status"] == "IN_QUEUE":
                self._log(cur, request_id, "cancellation requested")
                self._finish(cur, request_id, None, "IN_QUEUE", error=cancelled_error())
            elif not row["cancel_requested"]:
                self.q.run(cur, "request_cancel", request_id=request_id)
                self._log(cur, request_id, "cancellation requested")
            return "CANCELLATION_REQUESTED"
