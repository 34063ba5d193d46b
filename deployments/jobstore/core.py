"""The job store's operations, written once against :class:`Backend` (blocking; :class:`JobStore` runs them in
threads for async callers).

Every state change is one transaction. Runner writes are fenced: they name ``(request_id, epoch)`` and apply only
while the job is IN_PROGRESS under that epoch, so after a lease is reclaimed (epoch + 1) or the job finished, a
stale runner's write changes nothing and raises :class:`FencedError`. Only one ``complete`` can therefore win.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from deployments.jobs import JobError, Priority
from deployments.jobstore.backend import Backend, Cursor
from deployments.jobstore.errors import (
    FencedError,
    KeyQueueCapError,
    KeyRunningCapError,
    QueueFullError,
    RateLimitedError,
)
from deployments.jobstore.models import (
    PRIORITY_NAME,
    PRIORITY_RANK,
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
    iso_timestamp,
    outcome_of,
    runner_lost_error,
    start_timeout_error,
)

VIEW_COLUMNS = ("request_id, app_id, owner, kind, status, priority, created_at, start_deadline, started_at, "
                "completed_at, stage, progress, attempts, max_attempts, epoch, lease_owner, lease_expires_at, "
                "cancel_requested, checkpoint_step, webhook_url, result, result_keys, result_purged, error, "
                "outcome, log_seq")
CLAIM_COLUMNS = ("request_id, epoch, kind, owner, app_id, priority, input, seed, attempts, max_attempts, "
                 "lease_owner, lease_expires_at, created_at, started_at, checkpoint_key, checkpoint_step, "
                 "cancel_requested")
R = TypeVar("R")
MAINTENANCE_BATCH = 100  # expired leases / start deadlines handled inside one claim
MAX_CLAIM_CANDIDATES = 64  # rows a claim looks at before giving up (owners at their cap, late jobs)
MAX_BATCH = 1000  # retention rows per call
MAX_INPUT_BYTES = 64 * 1024
LOG_LEVELS = frozenset({"INFO", "WARN", "ERROR", "DEBUG", "STDOUT", "STDERR"})
_REQUEST_ID = re.compile(r"[0-9a-f]{32}")
_SECRET_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")

# Retention: which finished rows hold expired objects of each kind. The predicates repeat the partial indexes'
# WHERE clauses word for word, so both databases use those indexes.
_RETENTION_WHERE: dict[str, str] = {
    "results": "status = 'COMPLETED' AND NOT result_purged",
    "inputs": "status = 'COMPLETED' AND NOT inputs_purged",
    "checkpoints": "status = 'COMPLETED' AND checkpoint_key IS NOT NULL",
    "jobs": "status = 'COMPLETED'",
}
_RETENTION_PURGE: dict[str, str] = {
    "results": "UPDATE jobs SET result_purged = TRUE",
    "inputs": "UPDATE jobs SET inputs_purged = TRUE",
    "checkpoints": "UPDATE jobs SET checkpoint_key = NULL, checkpoint_step = NULL",
}


def _read(method: Callable[..., R]) -> Callable[..., R]:
    """A read whose pooled connection turned out dropped (a database restart or failover) runs once more on a
    fresh connection: reads are idempotent. Writes are never retried (a lost COMMIT reply is ambiguous)."""

    @functools.wraps(method)
    def run(self: SyncJobStore, *args: Any, **kwargs: Any) -> R:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            if not self.backend.is_disconnect(exc):
                raise
            return method(self, *args, **kwargs)

    return run


def _check_input(input: dict[str, Any]) -> None:
    """Rows hold references: a multi-megabyte ``data:`` URI in the input is a caller bug, refused here."""
    size = len(json.dumps(input, separators=(",", ":")))
    if size > MAX_INPUT_BYTES:
        raise ValueError(f"the job input is {size} bytes of JSON (limit {MAX_INPUT_BYTES}): it must hold references "
                         "(URLs, storage keys); write data: URIs to storage first")


def _check_lease(lease_s: float) -> None:
    if not lease_s > 0:
        raise ValueError(f"lease_s must be a positive number of seconds, got {lease_s!r}")


def new_request_id() -> str:
    """A server-issued request id (uuid4 hex): the only kind of id that ever keys job state."""
    return uuid.uuid4().hex


def _request_id(given: str | None) -> str:
    """``given`` (an id the service issued before creating the row, e.g. to name the input objects it wrote
    first) or a fresh one; anything but 32 lowercase hex digits is refused."""
    if given is None:
        return new_request_id()
    if not isinstance(given, str) or not _REQUEST_ID.fullmatch(given):
        raise ValueError(f"request_id must be 32 lowercase hex digits (new_request_id()), got {given!r}")
    return given


def _placeholders(n: int) -> str:
    return ", ".join("?" * n)


class SyncJobStore:
    """All operations, blocking. Thread-safe: each call takes its own pooled connection."""

    def __init__(self, backend: Backend, limits: JobLimits | None = None, migrate: bool = True):
        self.backend = backend
        self.limits = limits or JobLimits()
        self.migrations_applied: list[int] = backend.migrate() if migrate else []

    def close(self) -> None:
        self.backend.close()

    # -- small helpers -------------------------------------------------------------------------------------------
    def _x(self, cur: Cursor, sql: str, params: Sequence[Any] = ()) -> Cursor:
        cur.execute(self.backend.sql(sql), tuple(params))
        return cur

    def _count(self, cur: Cursor, where: str, params: Sequence[Any] = (), index: str | None = None) -> int:
        hint = self.backend.index_hint(index) if index else ""
        return int(self._x(cur, f"SELECT count(*) AS n FROM jobs {hint} WHERE {where}", params).fetchone()["n"])

    def _queued_total(self, cur: Cursor) -> int:
        return self._count(cur, "status = 'IN_QUEUE'", index="jobs_queue_order")

    def _running_total(self, cur: Cursor) -> int:
        return self._count(cur, "status = 'IN_PROGRESS'", index="jobs_running_owner")

    def _view(self, row: dict[str, Any]) -> JobView:
        j = self.backend.json_out
        error, result_keys = j(row["error"]), j(row["result_keys"]) or []
        return JobView(
            **{k: row[k] for k in ("request_id", "app_id", "owner", "kind", "status", "created_at",
                                   "start_deadline", "started_at", "completed_at", "stage", "progress",
                                   "attempts", "max_attempts", "epoch", "lease_owner", "lease_expires_at",
                                   "checkpoint_step", "webhook_url", "outcome")},
            priority=PRIORITY_NAME[int(row["priority"])], cancel_requested=bool(row["cancel_requested"]),
            result=j(row["result"]), result_keys=result_keys,
            # the column also reads TRUE when there was nothing to purge (no result objects)
            result_purged=bool(row["result_purged"]) and bool(result_keys),
            error=None if error is None else JobError(**error),
            log_count=int(row["log_seq"]),
        )

    def _claimed(self, row: dict[str, Any]) -> ClaimedJob:
        return ClaimedJob(**{**row, "priority": PRIORITY_NAME[int(row["priority"])],
                             "input": self.backend.json_out(row["input"]),
                             "cancel_requested": bool(row["cancel_requested"])})

    def _log(self, cur: Cursor, request_id: str, message: str, level: str = "INFO", source: str = "USER",
             line: int | None = None) -> int:
        """Append a line (an INSERT, plus trimming the line that fell out of the bound); 0 if the job is gone.
        ``line``: the caller already advanced ``log_seq`` in its own UPDATE of the job (one round trip less)."""
        if level not in LOG_LEVELS:
            raise ValueError(f"log level must be one of {sorted(LOG_LEVELS)}, got {level!r}")
        if line is None:
            row = self._x(cur, "UPDATE jobs SET log_seq = log_seq + 1 WHERE request_id = ? RETURNING log_seq",
                          (request_id,)).fetchone()
            if row is None:
                return 0
            line = int(row["log_seq"])
        self._x(cur, "INSERT INTO job_logs (request_id, line, ts, level, source, message) "
                     "VALUES (?, ?, {now}, ?, ?, ?)", (request_id, line, level, source, message))
        if line > self.limits.max_log_lines:
            self._x(cur, "DELETE FROM job_logs WHERE request_id = ? AND line <= ?",
                    (request_id, line - self.limits.max_log_lines))
        return line

    def _position(self, cur: Cursor, rank: int, seq: int) -> int:
        """Queued jobs ahead in dispatch order: a range count on the (priority, seq) queue index."""
        row = self._x(cur, "SELECT (SELECT count(*) FROM jobs WHERE status = 'IN_QUEUE' AND priority < ?) + "
                           "(SELECT count(*) FROM jobs WHERE status = 'IN_QUEUE' AND priority = ? AND seq < ?) AS n",
                      (rank, rank, seq)).fetchone()
        return int(row["n"])

    # -- rate limit ----------------------------------------------------------------------------------------------
    def _rate_limit(self, cur: Cursor, owner: str) -> None:
        """Take a token from ``owner``'s bucket (one row per owner, refilled at ``rate_per_s`` up to
        ``rate_burst``) in one atomic upsert; a bucket left below zero means refused: RateLimitedError, and the
        caller's transaction rolls back, so a refusal spends nothing."""
        rate, burst = self.limits.rate_per_s, float(self.limits.rate_burst)
        row = self._x(cur, """
            INSERT INTO rate_buckets (owner, tokens, updated_at) VALUES (?, ?, {now})
            ON CONFLICT (owner) DO UPDATE SET
                tokens = {least}(?, rate_buckets.tokens + {greatest}(0, {now} - rate_buckets.updated_at) * ?) - 1,
                updated_at = {greatest}(rate_buckets.updated_at, {now})
            RETURNING tokens""", (owner, burst - 1, burst, rate)).fetchone()
        tokens = float(row["tokens"])
        if tokens < 0:
            wait = -tokens / rate
            raise RateLimitedError(f"too many requests for this API key; retry in {wait:.1f} s", wait)

    def take_token(self, owner: str) -> float:
        """Spend one of ``owner``'s request tokens (routes other than submit and sync creation, which take theirs
        in their own transaction); returns 0.0, or the seconds to wait when none is left (nothing spent)."""
        try:
            with self.backend.write() as cur:
                self._rate_limit(cur, owner)
        except RateLimitedError as refused:
            return refused.retry_after_s
        return 0.0

    def prune_rate_buckets(self) -> int:
        """Delete buckets idle long enough to be full again (equivalent to no row): bounds the table."""
        idle_s = self.limits.rate_burst / self.limits.rate_per_s
        with self.backend.single() as cur:
            return self._x(cur, "DELETE FROM rate_buckets WHERE updated_at < {now} - ?", (idle_s,)).rowcount

    # -- creation ------------------------------------------------------------------------------------------------
    def submit(self, *, app_id: str, input: dict[str, Any], seed: int, owner: str = "",
               priority: Priority = "normal", webhook_url: str | None = None, start_timeout_s: float | None = None,
               max_queue_length: int | None = None, input_keys: Sequence[str] = (),
               rate_limited: bool = True, request_id: str | None = None) -> Submitted:
        """Queue a job; the row is committed before this returns. Caps are checked before the rate limit, so a
        refused submit costs no token. Raises QueueFullError, KeyQueueCapError or RateLimitedError.
        ``request_id``: an id from :func:`new_request_id` the caller already used (for its input objects)."""
        if priority not in PRIORITY_RANK:
            raise ValueError(f"priority must be one of {sorted(PRIORITY_RANK)}, got {priority!r}")
        _check_input(input)
        rank, request_id = PRIORITY_RANK[priority], _request_id(request_id)
        limit = self.limits.max_queue_length
        if max_queue_length is not None:
            limit = min(limit, max_queue_length)
        j = self.backend.json_in
        with self.backend.write() as cur:
            self.backend.lock(cur, "submit")  # queue caps are exact across processes
            # Under the submit lock every queued job has a smaller seq than the one inserted next, so the new
            # job's position is the count of queued jobs of its priority or a more urgent one.
            hint = self.backend.index_hint("jobs_queue_order")
            counts = self._x(cur, f"SELECT (SELECT count(*) FROM jobs {hint} WHERE status = 'IN_QUEUE') AS queued, "
                                  "(SELECT count(*) FROM jobs WHERE status = 'IN_QUEUE' AND owner = ?) AS mine, "
                                  "(SELECT count(*) FROM jobs WHERE status = 'IN_QUEUE' AND priority <= ?) AS ahead",
                             (owner, rank)).fetchone()
            queued, mine = int(counts["queued"]), int(counts["mine"])
            if queued >= limit:
                raise QueueFullError(f"the queue holds {queued} jobs (limit {limit})")
            if mine >= self.limits.max_queued_per_owner:
                raise KeyQueueCapError(f"this API key already has {mine} queued jobs (limit "
                                       f"{self.limits.max_queued_per_owner})")
            if rate_limited:
                self._rate_limit(cur, owner)
            self._x(cur, """
                INSERT INTO jobs (request_id, app_id, owner, kind, status, priority, input, input_keys, seed,
                                  webhook_url, created_at, start_deadline, stage, max_attempts, result_keys,
                                  inputs_purged, log_seq)
                VALUES (?, ?, ?, 'queue', 'IN_QUEUE', ?, ?, ?, ?, ?, {now}, {now} + ?, 'queued', ?, ?, ?, 1)""",
                    (request_id, app_id, owner, rank, j(input), j(list(input_keys)), seed, webhook_url,
                     start_timeout_s, self.limits.max_attempts, j([]), not input_keys))
            self._log(cur, request_id, f"queued ({priority} priority)", line=1)
            return Submitted(request_id=request_id, queue_position=int(counts["ahead"]))

    def create_sync(self, *, app_id: str, input: dict[str, Any], seed: int, runner_id: str, lease_s: float,
                    owner: str = "", input_keys: Sequence[str] = (), rate_limited: bool = True,
                    request_id: str | None = None) -> ClaimedJob:
        """A sync request's row, created already claimed (IN_PROGRESS, epoch 1, leased to ``runner_id``); it
        counts as a running job of ``owner``. Its lease expiring fails it (never re-queued). Raises
        KeyRunningCapError or RateLimitedError."""
        _check_input(input)
        _check_lease(lease_s)
        request_id, j = _request_id(request_id), self.backend.json_in
        with self.backend.write() as cur:
            self._check_running_cap(cur, owner)
            if rate_limited:
                self._rate_limit(cur, owner)
            row = self._x(cur, f"""
                INSERT INTO jobs (request_id, app_id, owner, kind, status, priority, input, input_keys, seed,
                                  created_at, started_at, stage, attempts, max_attempts, epoch, lease_owner,
                                  lease_expires_at, result_keys, inputs_purged, log_seq)
                VALUES (?, ?, ?, 'sync', 'IN_PROGRESS', 0, ?, ?, ?, {{now}}, {{now}}, 'starting', 1, 1, 1, ?,
                        {{now}} + ?, ?, ?, 1)
                RETURNING {CLAIM_COLUMNS}""", (request_id, app_id, owner, j(input), j(list(input_keys)), seed,
                                               runner_id, lease_s, j([]), not input_keys)).fetchone()
            self._log(cur, request_id, "started (sync request)", line=1)
            return self._claimed(row)

    def _check_running_cap(self, cur: Cursor, owner: str) -> None:
        cap = self.limits.max_running_per_owner
        if cap is None:
            return
        self.backend.lock(cur, f"owner:{owner}")  # exact per-key count across processes
        running = self._count(cur, "status = 'IN_PROGRESS' AND owner = ?", (owner,))
        if running >= cap:
            raise KeyRunningCapError(f"this API key already has {running} running jobs (limit {cap})")

    # -- reads (all owner-scoped: another owner's job does not exist) ------------------------------------------
    @_read
    def get(self, request_id: str, owner: str = "") -> JobView | None:
        with self.backend.read() as cur:
            row = self._x(cur, f"SELECT {VIEW_COLUMNS} FROM jobs WHERE request_id = ? AND owner = ?",
                          (request_id, owner)).fetchone()
            return None if row is None else self._view(row)

    @_read
    def position(self, request_id: str, owner: str | None = None) -> int | None:
        """Jobs ahead of this one in dispatch order (0 when it is not queued); None when unknown."""
        owned = "" if owner is None else " AND owner = ?"
        params = (request_id,) if owner is None else (request_id, owner)
        with self.backend.read() as cur:
            row = self._x(cur, f"SELECT status, priority, seq FROM jobs WHERE request_id = ?{owned}",
                          params).fetchone()
            if row is None:
                return None
            if row["status"] != "IN_QUEUE":
                return 0
            return self._position(cur, int(row["priority"]), int(row["seq"]))

    def _logs(self, cur: Cursor, request_id: str, since: int, limit: int | None) -> LogPage:
        rows = self._x(cur, "SELECT line, ts, level, source, message FROM job_logs WHERE request_id = ? "
                            "AND line > ? ORDER BY line LIMIT ?",
                       (request_id, since, limit or self.limits.max_log_lines)).fetchall()
        lines = [LogLine(line=int(r["line"]), message=r["message"], level=r["level"], source=r["source"],
                         timestamp=iso_timestamp(float(r["ts"]))) for r in rows]
        return LogPage(lines=lines, cursor=lines[-1].line if lines else since)

    @_read
    def logs(self, request_id: str, owner: str = "", since: int = 0, limit: int | None = None) -> LogPage | None:
        """Log lines numbered above ``since`` (an SSE stream passes the previous page's ``cursor``)."""
        with self.backend.read() as cur:
            if self._x(cur, "SELECT 1 AS ok FROM jobs WHERE request_id = ? AND owner = ?",
                       (request_id, owner)).fetchone() is None:
                return None
            return self._logs(cur, request_id, since, limit)

    @_read
    def status(self, request_id: str, owner: str = "", logs_since: int | None = None) -> JobSnapshot | None:
        """One status poll in one read: the job, its queue position, and (``logs_since`` given) new log lines."""
        with self.backend.read() as cur:
            row = self._x(cur, f"SELECT {VIEW_COLUMNS}, seq FROM jobs WHERE request_id = ? AND owner = ?",
                          (request_id, owner)).fetchone()
            if row is None:
                return None
            job = self._view(row)
            position = self._position(cur, int(row["priority"]), int(row["seq"])) if job.status == "IN_QUEUE" else 0
            logs = None if logs_since is None else self._logs(cur, request_id, logs_since, None)
            return JobSnapshot(job=job, position=position, logs=logs)

    @_read
    def queue_length(self) -> int:
        with self.backend.read() as cur:
            return self._queued_total(cur)

    @_read
    def queued_count(self, owner: str | None = None) -> int:
        """Queued jobs, of ``owner`` alone when given (the Gateway checks the queue caps before it reads a body)."""
        if owner is None:
            return self.queue_length()
        with self.backend.read() as cur:
            return self._count(cur, "status = 'IN_QUEUE' AND owner = ?", (owner,))

    @_read
    def running_count(self, owner: str | None = None) -> int:
        with self.backend.read() as cur:
            if owner is None:
                return self._running_total(cur)
            return self._count(cur, "status = 'IN_PROGRESS' AND owner = ?", (owner,))

    # -- cancel --------------------------------------------------------------------------------------------------
    def cancel(self, request_id: str, owner: str = "") -> CancelResult:
        """A queued job is finished as cancelled at once; a running one gets ``cancel_requested``, which its
        runner sees on its next heartbeat or write (and which a lease expiry turns into a cancellation)."""
        with self.backend.write() as cur:
            row = self._x(cur, "SELECT status, cancel_requested FROM jobs WHERE request_id = ? AND owner = ? "
                               "{for_update}", (request_id, owner)).fetchone()
            if row is None:
                return "NOT_FOUND"
            if row["status"] == "COMPLETED":
                return "ALREADY_COMPLETED"
            if row["status"] == "IN_QUEUE":
                self._log(cur, request_id, "cancellation requested")
                self._finish(cur, request_id, None, "IN_QUEUE", error=cancelled_error())
            elif not row["cancel_requested"]:
                self._x(cur, "UPDATE jobs SET cancel_requested = TRUE WHERE request_id = ?", (request_id,))
                self._log(cur, request_id, "cancellation requested")
            return "CANCELLATION_REQUESTED"

    # -- finishing (shared by complete, cancel, expiry) ----------------------------------------------------------
    def _finish(self, cur: Cursor, request_id: str, epoch: int | None, expect_status: str,
                result: dict[str, Any] | None = None, result_keys: Sequence[str] = (),
                error: JobError | None = None) -> JobView | None:
        """COMPLETED with a result or an error, if still ``expect_status`` (and ``epoch``); owes the webhook."""
        outcome = outcome_of(error)
        stage = {"succeeded": "completed", "failed": "failed", "cancelled": "cancelled"}[outcome]
        fence = "" if epoch is None else " AND epoch = ?"
        j = self.backend.json_in
        row = self._x(cur, f"""
            UPDATE jobs SET status = 'COMPLETED', completed_at = {{now}}, outcome = ?, stage = ?,
                progress = COALESCE(?, progress), result = ?, result_keys = ?, result_purged = ?, error = ?,
                lease_owner = NULL, lease_expires_at = NULL, log_seq = log_seq + 1
            WHERE request_id = ? AND status = ?{fence}
            RETURNING {VIEW_COLUMNS}""",
                      (outcome, stage, 1.0 if error is None else None, j(result), j(list(result_keys)),
                       not result_keys, None if error is None else j(error.model_dump()), request_id,
                       expect_status, *(() if epoch is None else (epoch,)))).fetchone()
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
            self._x(cur, "INSERT INTO webhooks (request_id, url, state, next_attempt_at, created_at, updated_at) "
                         "VALUES (?, ?, 'pending', {now}, {now}, {now}) ON CONFLICT (request_id) DO NOTHING",
                    (request_id, job.webhook_url))
        return job

    # -- dispatch ------------------------------------------------------------------------------------------------
    def claim(self, runner_id: str, lease_s: float, max_running_total: int | None = None) -> ClaimedJob | None:
        """The next job for ``runner_id``, leased for ``lease_s`` seconds, or None.

        First, in the same transaction, expired leases are handled (queue jobs re-queued in their old place, sync
        jobs and jobs out of attempts failed, cancel-requested ones cancelled) and queued jobs past their start
        deadline are failed. Then the first queued job in (priority, seq) order whose owner is below its running
        cap is taken: ``epoch + 1``, ``attempts + 1``. ``max_running_total`` caps all IN_PROGRESS jobs (queue and
        sync) across every dispatcher sharing the database.
        """
        _check_lease(lease_s)
        with self.backend.write() as cur:
            self._expire_leases(cur, MAINTENANCE_BATCH)
            self._expire_start_deadlines(cur, MAINTENANCE_BATCH)
            if max_running_total is not None:
                self.backend.lock(cur, "claim")
                if self._running_total(cur) >= max_running_total:
                    return None
            cap = self.limits.max_running_per_owner
            blocked: list[str] = []
            if cap is not None:
                hint = self.backend.index_hint("jobs_running_owner")
                blocked = [r["owner"] for r in self._x(
                    cur, f"SELECT owner FROM jobs {hint} WHERE status = 'IN_PROGRESS' GROUP BY owner "
                         "HAVING count(*) >= ?", (cap,)).fetchall()]
            for _ in range(MAX_CLAIM_CANDIDATES):
                skip = f" AND owner NOT IN ({_placeholders(len(blocked))})" if blocked else ""
                row = self._x(cur, "SELECT request_id, owner, attempts, max_attempts, CASE WHEN started_at IS NULL "
                                   "AND start_deadline < {now} THEN 1 ELSE 0 END AS late FROM jobs "
                                   f"WHERE status = 'IN_QUEUE'{skip} ORDER BY priority, seq LIMIT 1 {{skip_locked}}",
                              blocked).fetchone()
                if row is None:
                    return None
                request_id = row["request_id"]
                if row["late"]:
                    self._log(cur, request_id, "not started before its X-Fal-Request-Timeout deadline", "ERROR")
                    self._finish(cur, request_id, None, "IN_QUEUE", error=start_timeout_error())
                    continue
                if row["attempts"] >= row["max_attempts"]:
                    self._finish(cur, request_id, None, "IN_QUEUE", error=runner_lost_error(
                        "the job was started too often without finishing", int(row["attempts"])))
                    continue
                if cap is not None and self._owner_busy(cur, row["owner"], cap):
                    blocked.append(row["owner"])
                    continue
                row = self._x(cur, f"""
                    UPDATE jobs SET status = 'IN_PROGRESS', epoch = epoch + 1, attempts = attempts + 1,
                        lease_owner = ?, lease_expires_at = {{now}} + ?, started_at = COALESCE(started_at, {{now}}),
                        stage = 'starting', log_seq = log_seq + 1
                    WHERE request_id = ? RETURNING {CLAIM_COLUMNS}, log_seq""", (runner_id, lease_s, request_id)).fetchone()
                claimed = self._claimed(row)
                if claimed.attempts == 1:
                    message = "started"
                elif claimed.checkpoint_step is not None:
                    message = (f"started again (attempt {claimed.attempts}); resuming from the checkpoint after "
                               f"step {claimed.checkpoint_step}")
                else:
                    message = f"started again (attempt {claimed.attempts})"
                self._log(cur, request_id, message, line=int(row["log_seq"]))
                return claimed
            return None

    def _owner_busy(self, cur: Cursor, owner: str, cap: int) -> bool:
        """Whether ``owner`` is at its running cap. Never waits for the key's lock while holding others (two claims
        taking two keys' locks in opposite order would deadlock): a key that another transaction is starting a
        job for counts as busy this time."""
        if not self.backend.lock(cur, f"owner:{owner}", wait=False):
            return True
        return self._count(cur, "status = 'IN_PROGRESS' AND owner = ?", (owner,)) >= cap

    def _expire_leases(self, cur: Cursor, limit: int) -> int:
        rows = self._x(cur, "SELECT request_id, kind, epoch, attempts, max_attempts, cancel_requested, lease_owner "
                            "FROM jobs WHERE status = 'IN_PROGRESS' AND lease_expires_at < {now} "
                            "ORDER BY lease_expires_at LIMIT ? {skip_locked}", (limit,)).fetchall()
        for r in rows:
            request_id, epoch, attempts = r["request_id"], int(r["epoch"]), int(r["attempts"])
            lost = f"the runner {r['lease_owner']} stopped renewing its lease"
            if r["cancel_requested"]:
                self._finish(cur, request_id, epoch, "IN_PROGRESS", error=cancelled_error())
            elif r["kind"] == "sync":  # its caller's HTTP request is gone with the runner: never re-queued
                self._finish(cur, request_id, epoch, "IN_PROGRESS",
                             error=runner_lost_error(f"{lost} (sync request)", attempts))
            elif attempts >= int(r["max_attempts"]):
                self._finish(cur, request_id, epoch, "IN_PROGRESS", error=runner_lost_error(lost, attempts))
            else:
                self._x(cur, "UPDATE jobs SET status = 'IN_QUEUE', stage = 'queued', lease_owner = NULL, "
                             "lease_expires_at = NULL WHERE request_id = ? AND epoch = ? AND status = 'IN_PROGRESS'",
                        (request_id, epoch))
                self._log(cur, request_id, f"{lost} (attempt {attempts}); queued again, it resumes from its last "
                                           "checkpoint", "WARN")
        return len(rows)

    def _expire_start_deadlines(self, cur: Cursor, limit: int) -> int:
        rows = self._x(cur, "SELECT request_id FROM jobs WHERE status = 'IN_QUEUE' AND start_deadline IS NOT NULL "
                            "AND start_deadline < {now} AND started_at IS NULL ORDER BY start_deadline LIMIT ? "
                            "{skip_locked}", (limit,)).fetchall()
        for r in rows:
            self._log(cur, r["request_id"], "not started before its X-Fal-Request-Timeout deadline", "ERROR")
            self._finish(cur, r["request_id"], None, "IN_QUEUE", error=start_timeout_error())
        return len(rows)

    def expire_leases(self, limit: int = MAINTENANCE_BATCH) -> int:
        """Handle up to ``limit`` expired leases now (``claim`` also does); returns how many."""
        with self.backend.write() as cur:
            return self._expire_leases(cur, limit)

    def expire_start_deadlines(self, limit: int = MAINTENANCE_BATCH) -> int:
        """Fail up to ``limit`` queued jobs past their start deadline with fal's timeout error; returns how many."""
        with self.backend.write() as cur:
            return self._expire_start_deadlines(cur, limit)

    def maintain(self, limit: int = MAINTENANCE_BATCH) -> tuple[int, int]:
        """``expire_leases`` and ``expire_start_deadlines`` in one transaction, for a dispatcher that is not
        claiming (it is at its own capacity) but must still enforce deadlines; returns both counts."""
        with self.backend.write() as cur:
            return self._expire_leases(cur, limit), self._expire_start_deadlines(cur, limit)

    # -- service-wide values -------------------------------------------------------------------------------------
    @_read
    def ping(self) -> bool:
        """One round trip (readiness checks)."""
        with self.backend.read() as cur:
            return self._x(cur, "SELECT 1 AS ok").fetchone() is not None

    def shared_secret(self, name: str) -> str:
        """The secret called ``name``, created on first use with insert-if-absent: every process sharing the
        database (Gateways, dispatchers, applications) gets the same value, whoever asks first. It lives in the
        database only, never in storage where a public link could reach it."""
        if not isinstance(name, str) or not _SECRET_NAME.fullmatch(name):
            raise ValueError(f"secret name must be lowercase letters, digits, '_', '.' or '-', got {name!r}")
        with self.backend.write() as cur:
            self._x(cur, "INSERT INTO service_secrets (name, value, created_at) VALUES (?, ?, {now}) "
                         "ON CONFLICT (name) DO NOTHING", (name, secrets.token_urlsafe(32)))
            return str(self._x(cur, "SELECT value FROM service_secrets WHERE name = ?", (name,)).fetchone()["value"])

    # -- fenced runner writes ------------------------------------------------------------------------------------
    def _fenced(self, cur: Cursor, request_id: str, epoch: int, what: str, assignments: str,
                params: Sequence[Any] = ()) -> dict[str, Any]:
        row = self._x(cur, f"UPDATE jobs SET {assignments} WHERE request_id = ? AND epoch = ? "
                           "AND status = 'IN_PROGRESS' RETURNING cancel_requested",
                      (*params, request_id, epoch)).fetchone()
        if row is None:
            raise FencedError(request_id, epoch, what)
        return row

    def heartbeat(self, request_id: str, epoch: int, lease_s: float) -> bool:
        """Renew the lease for ``lease_s`` seconds from now; returns whether cancellation was requested."""
        _check_lease(lease_s)
        with self.backend.single() as cur:
            return bool(self._fenced(cur, request_id, epoch, "heartbeat", "lease_expires_at = {now} + ?",
                                     (lease_s,))["cancel_requested"])

    def report(self, request_id: str, epoch: int, *, stage: str | None = None, progress: float | None = None,
               message: str | None = None, level: str = "INFO", lease_s: float | None = None) -> bool:
        """Stage/progress (and optionally a log line and a lease renewal) in one write; returns cancel_requested."""
        if progress is not None:
            progress = max(0.0, min(1.0, float(progress)))
        with self.backend.write() if message else self.backend.single() as cur:
            row = self._fenced(cur, request_id, epoch, "progress",
                               "stage = COALESCE(?, stage), progress = COALESCE(?, progress), "
                               "lease_expires_at = COALESCE({now} + ?, lease_expires_at)", (stage, progress, lease_s))
            if message:
                self._log(cur, request_id, message, level)
            return bool(row["cancel_requested"])

    def log(self, request_id: str, epoch: int, message: str, level: str = "INFO") -> bool:
        """Append a log line as the lease holder; returns cancel_requested."""
        with self.backend.write() as cur:
            row = self._fenced(cur, request_id, epoch, "log", "log_seq = log_seq")
            self._log(cur, request_id, message, level)
            return bool(row["cancel_requested"])

    def record_checkpoint(self, request_id: str, epoch: int, key: str, step: int) -> str | None:
        """Point the job at its latest checkpoint object; returns the previous key when it differs (the caller
        deletes that object). Write the object first, then record it: a fenced runner's object is never named."""
        with self.backend.write() as cur:
            row = self._x(cur, "SELECT checkpoint_key FROM jobs WHERE request_id = ? AND epoch = ? "
                               "AND status = 'IN_PROGRESS' {for_update}", (request_id, epoch)).fetchone()
            if row is None:
                raise FencedError(request_id, epoch, "checkpoint")
            self._x(cur, "UPDATE jobs SET checkpoint_key = ?, checkpoint_step = ? WHERE request_id = ?",
                    (key, step, request_id))
            previous = row["checkpoint_key"]
            return previous if previous != key else None

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
            return job

    def release(self, request_id: str, epoch: int, reason: str, refund_attempt: bool = True) -> JobView:
        """Give the job back (the runner is shutting down): a queue job is queued again in its old place (with
        its attempt refunded unless told otherwise), a sync job is failed, a cancel-requested one is cancelled."""
        with self.backend.write() as cur:
            row = self._x(cur, "SELECT kind, attempts, cancel_requested FROM jobs WHERE request_id = ? "
                               "AND epoch = ? AND status = 'IN_PROGRESS' {for_update}", (request_id, epoch)).fetchone()
            if row is None:
                raise FencedError(request_id, epoch, "release")
            if row["cancel_requested"]:
                job = self._finish(cur, request_id, epoch, "IN_PROGRESS", error=cancelled_error())
            elif row["kind"] == "sync":
                job = self._finish(cur, request_id, epoch, "IN_PROGRESS",
                                   error=runner_lost_error(reason, int(row["attempts"])))
            else:
                self._x(cur, "UPDATE jobs SET status = 'IN_QUEUE', stage = 'queued', lease_owner = NULL, "
                             "lease_expires_at = NULL, attempts = attempts - ? WHERE request_id = ?",
                        (1 if refund_attempt else 0, request_id))
                self._log(cur, request_id, f"{reason}; queued again, it resumes from its last checkpoint", "WARN")
                job = self._view(self._x(cur, f"SELECT {VIEW_COLUMNS} FROM jobs WHERE request_id = ?",
                                         (request_id,)).fetchone())
            assert job is not None
            return job

    # -- webhooks (an outbox: a row is owed in the same transaction that finished the job) -----------------------
    def claim_webhooks(self, worker_id: str, lease_s: float, limit: int = 10) -> list[WebhookDelivery]:
        """Up to ``limit`` due deliveries, leased to ``worker_id``: no other caller gets them until the lease runs
        out (then they are due again). Each claim counts an attempt; ``attempt`` fences the outcome report."""
        with self.backend.write() as cur:
            rows = self._x(cur, "SELECT request_id FROM webhooks WHERE state = 'pending' AND next_attempt_at <= {now} "
                                "ORDER BY next_attempt_at LIMIT ? {skip_locked}", (limit,)).fetchall()
            out = []
            for r in rows:
                row = self._x(cur, "UPDATE webhooks SET attempts = attempts + 1, lease_owner = ?, "
                                   "lease_expires_at = {now} + ?, next_attempt_at = {now} + ?, updated_at = {now} "
                                   "WHERE request_id = ? RETURNING request_id, url, attempts, lease_expires_at, "
                                   "(SELECT owner FROM jobs WHERE jobs.request_id = webhooks.request_id) AS owner",
                              (worker_id, lease_s, lease_s, r["request_id"])).fetchone()
                out.append(WebhookDelivery(request_id=row["request_id"], owner=row["owner"] or "", url=row["url"],
                                           attempt=int(row["attempts"]),
                                           lease_expires_at=float(row["lease_expires_at"])))
            return out

    def _webhook_outcome(self, request_id: str, attempt: int, assignments: str, params: Sequence[Any],
                         message: str | None, level: str) -> bool:
        with self.backend.write() as cur:
            row = self._x(cur, f"UPDATE webhooks SET {assignments}, lease_owner = NULL, lease_expires_at = NULL, "
                               "updated_at = {now} WHERE request_id = ? AND attempts = ? AND state = 'pending' "
                               "RETURNING request_id", (*params, request_id, attempt)).fetchone()
            if row is not None and message:
                self._log(cur, request_id, message, level)
            return row is not None

    def webhook_delivered(self, request_id: str, attempt: int, message: str | None = None) -> bool:
        """Record a successful delivery (and log ``message`` on the job); False if the lease was lost."""
        return self._webhook_outcome(request_id, attempt, "state = 'delivered'", (), message, "INFO")

    def webhook_failed(self, request_id: str, attempt: int, error: str, retry_in_s: float | None = None,
                       message: str | None = None) -> bool:
        """Record a failed attempt: due again in ``retry_in_s`` seconds, or given up for good when None."""
        if retry_in_s is None:
            return self._webhook_outcome(request_id, attempt, "state = 'failed', last_error = ?", (error,),
                                         message, "ERROR")
        return self._webhook_outcome(request_id, attempt, "next_attempt_at = {now} + ?, last_error = ?",
                                     (retry_in_s, error), message, "WARN")

    @_read
    def webhook_state(self, request_id: str) -> dict[str, Any] | None:
        """``state`` (pending/delivered/failed), ``attempts`` and ``last_error`` of a job's webhook."""
        with self.backend.read() as cur:
            row = self._x(cur, "SELECT state, attempts, last_error FROM webhooks WHERE request_id = ?",
                          (request_id,)).fetchone()
            return None if row is None else dict(row)

    # -- retention -----------------------------------------------------------------------------------------------
    @_read
    def expired(self, kind: RetentionKind, older_than_s: float, limit: int = 100) -> list[ExpiredItem]:
        """Finished jobs (oldest first, at most ``limit``) whose ``kind`` of objects is older than the TTL, with
        the storage keys to delete. Delete the objects, then call :meth:`purge` with the ids (idempotent: a crash
        in between only repeats the deletes)."""
        if kind not in _RETENTION_WHERE:
            raise ValueError(f"retention kind must be one of {sorted(_RETENTION_WHERE)}, got {kind!r}")
        limit = max(1, min(int(limit), MAX_BATCH))
        with self.backend.read() as cur:
            rows = self._x(cur, "SELECT request_id, input_keys, inputs_purged, result_keys, result_purged, "
                                f"checkpoint_key FROM jobs WHERE {_RETENTION_WHERE[kind]} AND completed_at < "
                                "{now} - ? ORDER BY completed_at LIMIT ?", (older_than_s, limit)).fetchall()
        j = self.backend.json_out
        items = []
        for r in rows:
            inputs = [] if r["inputs_purged"] else list(j(r["input_keys"]) or [])
            results = [] if r["result_purged"] else list(j(r["result_keys"]) or [])
            checkpoint = [r["checkpoint_key"]] if r["checkpoint_key"] else []
            keys = {"inputs": inputs, "results": results, "checkpoints": checkpoint,
                    "jobs": inputs + results + checkpoint}[kind]
            items.append(ExpiredItem(request_id=r["request_id"], keys=keys))
        return items

    def purge(self, kind: RetentionKind, request_ids: Sequence[str], older_than_s: float) -> int:
        """Mark ``kind`` purged on these jobs (results: the result route answers 410; checkpoints: key cleared), or
        for ``jobs`` delete the rows with their logs and webhooks. Re-checks the TTL; returns rows changed."""
        if kind not in _RETENTION_WHERE:
            raise ValueError(f"retention kind must be one of {sorted(_RETENTION_WHERE)}, got {kind!r}")
        ids = list(dict.fromkeys(request_ids))[:MAX_BATCH]
        if not ids:
            return 0
        where = f"request_id IN ({_placeholders(len(ids))}) AND {_RETENTION_WHERE[kind]} AND completed_at < {{now}} - ?"
        with self.backend.write() as cur:
            if kind != "jobs":
                return self._x(cur, f"{_RETENTION_PURGE[kind]} WHERE {where}", (*ids, older_than_s)).rowcount
            gone = [r["request_id"] for r in self._x(cur, f"DELETE FROM jobs WHERE {where} RETURNING request_id",
                                                      (*ids, older_than_s)).fetchall()]
            if gone:
                marks = _placeholders(len(gone))
                self._x(cur, f"DELETE FROM job_logs WHERE request_id IN ({marks})", gone)
                self._x(cur, f"DELETE FROM webhooks WHERE request_id IN ({marks})", gone)
            return len(gone)

    @_read
    def named_keys(self, keys: Sequence[str], read_by_unfinished_only: bool = False) -> set[str]:
        """Which of ``keys`` (at most 1000) a row still names: an input of an unfinished job or of a finished one
        whose inputs were not purged, a result not purged, a checkpoint (to resume from, or not yet swept), or any
        string in the input of an unfinished job (an upload, or an earlier result, that it will read). The
        retention sweeper deletes an old object found by listing only when no row names it (an orphan), and keeps
        the objects of expired rows that an unfinished job reads (``read_by_unfinished_only``: that last source
        alone). Each source is read through its partial index, so the cost follows the rows retention keeps live
        (and the queue), not the table."""
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return set()
        if len(wanted) > MAX_BATCH:
            raise ValueError(f"named_keys takes at most {MAX_BATCH} keys, got {len(wanted)}")
        b = self.backend
        unfinished = [("status = 'IN_QUEUE'", "jobs_queue_order"), ("status = 'IN_PROGRESS'", "jobs_running_owner")]
        from_item, value, is_text = b.json_strings("jobs.input", "s")
        selects = [f"SELECT {value} AS key FROM jobs {b.index_hint(index)}, {from_item} WHERE {where} AND {is_text} "
                   f"AND {value} IN (SELECT value FROM wanted)" for where, index in unfinished]
        if not read_by_unfinished_only:
            sources = [("input_keys", "status = 'COMPLETED' AND NOT inputs_purged", "jobs_finished_inputs"),
                       *(("input_keys", where, index) for where, index in unfinished),
                       ("result_keys", "status = 'COMPLETED' AND NOT result_purged", "jobs_finished_results")]
            selects += [f"SELECT e.value AS key FROM jobs {b.index_hint(index)}, "
                        f"{b.json_elements(f'jobs.{column}', 'e')} WHERE {where} "
                        "AND e.value IN (SELECT value FROM wanted)" for column, where, index in sources]
            checkpoints = [("status = 'COMPLETED' AND checkpoint_key IS NOT NULL", "jobs_finished_checkpoints"),
                           *unfinished]
            selects += [f"SELECT checkpoint_key AS key FROM jobs {b.index_hint(index)} WHERE {where} "
                        "AND checkpoint_key IN (SELECT value FROM wanted)" for where, index in checkpoints]
        statement = f"WITH wanted(value) AS ({b.text_list_rows()}) " + " UNION ".join(selects)
        with b.read() as cur:
            return {r["key"] for r in self._x(cur, statement, (b.text_list_in(wanted),)).fetchall()}

    # -- maintenance leases (one process of all that share the database runs a periodic task) -------------------
    def acquire_lease(self, name: str, owner: str, lease_s: float) -> int | None:
        """Take the lease ``name`` for ``lease_s`` seconds if it is free, expired, or already ``owner``'s;
        returns its new epoch (the holder's fencing token), or None while another owner holds it."""
        _check_lease(lease_s)
        with self.backend.single() as cur:
            row = self._x(cur, """
                INSERT INTO maintenance_leases (name, owner, epoch, expires_at, updated_at)
                VALUES (?, ?, 1, {now} + ?, {now})
                ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, epoch = maintenance_leases.epoch + 1,
                    expires_at = excluded.expires_at, updated_at = excluded.updated_at
                WHERE maintenance_leases.expires_at <= excluded.updated_at
                   OR maintenance_leases.owner = excluded.owner
                RETURNING epoch""", (name, owner, lease_s)).fetchone()
        return None if row is None else int(row["epoch"])

    def renew_lease(self, name: str, owner: str, epoch: int, lease_s: float) -> bool:
        """Extend the lease by ``lease_s`` from now; False once another owner took it (stop working)."""
        _check_lease(lease_s)
        with self.backend.single() as cur:
            return self._x(cur, "UPDATE maintenance_leases SET expires_at = {now} + ?, updated_at = {now} "
                                "WHERE name = ? AND owner = ? AND epoch = ? RETURNING name",
                           (lease_s, name, owner, epoch)).fetchone() is not None

    def release_lease(self, name: str, owner: str, epoch: int, keep_s: float = 0.0) -> bool:
        """End the lease ``keep_s`` seconds from now (0: now, the next :meth:`acquire_lease` gets it; more: nobody
        else runs the task before then, e.g. until the next periodic run is due); False if it was not held."""
        if not keep_s >= 0:
            raise ValueError(f"keep_s must be a non-negative number of seconds, got {keep_s!r}")
        with self.backend.single() as cur:
            return self._x(cur, "UPDATE maintenance_leases SET expires_at = {now} + ?, updated_at = {now} "
                                "WHERE name = ? AND owner = ? AND epoch = ? RETURNING name",
                           (keep_s, name, owner, epoch)).fetchone() is not None

    @_read
    def lease_holder(self, name: str) -> dict[str, Any] | None:
        """``owner``, ``epoch`` and ``expires_at`` (database clock) of the lease ``name``, if it was ever taken."""
        with self.backend.read() as cur:
            row = self._x(cur, "SELECT owner, epoch, expires_at FROM maintenance_leases WHERE name = ?",
                          (name,)).fetchone()
            return None if row is None else dict(row)
