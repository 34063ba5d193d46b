"""Dispatch: claims under a lease, lease renewal and expiry, start deadlines, handing a job back.

Runner writes are fenced: they name ``(request_id, epoch)`` and apply only while the job is IN_PROGRESS under that
epoch, so after a lease is reclaimed (epoch + 1) or the job finished, a stale runner's write changes nothing and
raises :class:`FencedError`.
"""

from __future__ import annotations

from typing import Any

from deployments.jobstore.backend import Cursor
from deployments.jobstore.columns import claimed_job
from deployments.jobstore.errors import FencedError
from deployments.jobstore.models import (
    ClaimedJob,
    JobView,
    cancelled_error,
    runner_lost_error,
    start_timeout_error,
)
from deployments.jobstore.operations.base import StoreBase, check_lease, check_timeout

MAINTENANCE_BATCH = 100  # expired leases / start deadlines handled inside one claim
MAX_CLAIM_CANDIDATES = 64  # rows a claim looks at before giving up (owners at their cap, late jobs)
START_DEADLINE_MISSED = "not started before its X-Fal-Request-Timeout deadline"


class ClaimOps(StoreBase):
    def claim(self, runner_id: str, lease_s: float, max_running_total: int | None = None,
              model_fingerprint: str = "") -> ClaimedJob | None:
        """The next job submitted to ``model_fingerprint`` for ``runner_id``, leased for ``lease_s`` seconds, or None
        (during an upgrade that changes the weights, each application finishes the jobs submitted to it).

        First, in the same transaction, expired leases are handled (queue jobs re-queued in their old place, sync
        jobs and jobs out of attempts failed, cancel-requested ones cancelled) and queued jobs past their start
        deadline are failed. Then a job is taken (``epoch + 1``, ``attempts + 1``) fairly between API keys: of the
        keys below their running cap, the one running the fewest jobs goes first, then priority, then age, so one
        key's backlog cannot hold every slot while another waits. Jobs still backing off after a retry wait.
        ``max_running_total`` caps all IN_PROGRESS jobs (queue and sync) across every dispatcher on the database.
        """
        check_lease(lease_s)
        with self.backend.write() as cur:
            self._expire_leases(cur, MAINTENANCE_BATCH)
            self._expire_start_deadlines(cur, MAINTENANCE_BATCH)
            if max_running_total is not None:
                self.backend.lock(cur, "claim")  # the total is exact across dispatchers
            running = {r["owner"]: int(r["n"]) for r in self.q.all(cur, "running_by_owner")}
            if max_running_total is not None and sum(running.values()) >= max_running_total:
                return None
            cap = self.limits.max_running_per_owner
            blocked = {owner for owner, n in running.items() if cap is not None and n >= cap}
            for _ in range(MAX_CLAIM_CANDIDATES):
                row = self._candidate(cur, model_fingerprint, running, blocked)
                if row is None:
                    return None
                request_id = row["request_id"]
                if row["late"]:
                    self._log(cur, request_id, START_DEADLINE_MISSED, "ERROR")
                    self._finish(cur, request_id, None, "IN_QUEUE", error=start_timeout_error())
                    continue
                if row["attempts"] >= row["max_attempts"]:
                    self._finish(cur, request_id, None, "IN_QUEUE", error=runner_lost_error(
                        "the job was started too often without finishing", int(row["attempts"])), dead_letter=True)
                    continue
                if cap is not None and self._owner_busy(cur, row["owner"], cap):
                    blocked.add(row["owner"])
                    continue
                return self._start(cur, request_id, runner_id, lease_s)
            return None

    def _candidate(self, cur: Cursor, model_fingerprint: str, running: dict[str, int], blocked: set[str]
                   ) -> dict[str, Any] | None:
        """The next job by fairness: keys running no job first, then keys running fewer; within those, priority,
        then age. Keys in ``blocked`` (at their running cap) are skipped."""
        listed = self.backend.list_in
        row = self.q.one(cur, "claim_candidate_of_idle_keys", model_fingerprint=model_fingerprint,
                         owners=listed(sorted(running.keys() | blocked)))
        if row is not None:
            return row
        for tier in sorted({n for owner, n in running.items() if owner not in blocked}):
            keys = sorted(owner for owner, n in running.items() if n == tier and owner not in blocked)
            row = self.q.one(cur, "claim_candidate_of_keys", model_fingerprint=model_fingerprint, owners=listed(keys))
            if row is not None:
                return row
        return None

    def _start(self, cur: Cursor, request_id: str, runner_id: str, lease_s: float) -> ClaimedJob:
        row = self.q.one(cur, "start_job", request_id=request_id, runner_id=runner_id, lease_s=lease_s)
        assert row is not None
        claimed = claimed_job(row, self.backend.json_out)
        self._begin_attempt(cur, claimed)
        if claimed.checkpoint_key is not None and row["checkpoint_fingerprint"] != claimed.model_fingerprint:
            self.q.run(cur, "forget_checkpoint", request_id=request_id)
            self._log(cur, request_id, "its checkpoint was written by another model; it starts over", "WARN")
            claimed = claimed.model_copy(update={"checkpoint_key": None, "checkpoint_step": None})
        if claimed.attempts == 1:
            message = "started"
        elif claimed.checkpoint_step is not None:
            message = (f"started again (attempt {claimed.attempts}); resuming from the checkpoint after step "
                       f"{claimed.checkpoint_step}")
        else:
            message = f"started again (attempt {claimed.attempts})"
        self._log(cur, request_id, message, line=int(row["log_seq"]))
        return claimed

    def _owner_busy(self, cur: Cursor, owner: str, cap: int) -> bool:
        """Whether ``owner`` is at its running cap. Never waits for the key's lock while holding others (two claims
        taking two keys' locks in opposite order would deadlock): a key that another transaction is starting a
        job for counts as busy this time."""
        if not self.backend.lock(cur, f"owner:{owner}", wait=False):
            return True
        return self.q.count(cur, "running_of_owner", owner=owner) >= cap

    def _expire_leases(self, cur: Cursor, limit: int) -> int:
        rows = self.q.all(cur, "expired_leases", limit=limit)
        for r in rows:
            request_id, epoch, attempts = r["request_id"], int(r["epoch"]), int(r["attempts"])
            lost = f"the runner {r['lease_owner']} stopped renewing its lease"
            self._end_attempt(cur, request_id, epoch, "lost", "lease_expired", lost)
            if r["cancel_requested"]:
                self._finish(cur, request_id, epoch, "IN_PROGRESS", error=cancelled_error())
            elif r["kind"] == "sync":  # its caller's HTTP request is gone with the runner: never re-queued
                self._finish(cur, request_id, epoch, "IN_PROGRESS",
                             error=runner_lost_error(f"{lost} (sync request)", attempts))
            elif attempts >= int(r["max_attempts"]):
                self._finish(cur, request_id, epoch, "IN_PROGRESS", error=runner_lost_error(lost, attempts),
                             dead_letter=True)
            else:
                self.q.run(cur, "requeue_expired", request_id=request_id, epoch=epoch)
                self._announce(cur, r["model_fingerprint"])
                self._log(cur, request_id, f"{lost} (attempt {attempts}); queued again, it resumes from its last "
                                           "checkpoint", "WARN")
        return len(rows)

    def _expire_start_deadlines(self, cur: Cursor, limit: int) -> int:
        rows = self.q.all(cur, "late_jobs", limit=limit)
        for r in rows:
            self._log(cur, r["request_id"], START_DEADLINE_MISSED, "ERROR")
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

    def wait_for_job(self, timeout_s: float, model_fingerprint: str = "") -> bool:
        """Block an idle runner until a job of ``model_fingerprint`` is queued (True: claim now) or ``timeout_s``
        passed (False: claim anyway, the poll). PostgreSQL wakes it through LISTEN/NOTIFY within milliseconds of
        the submit's commit; SQLite has no notifications and this is the pause between polls."""
        check_timeout(timeout_s)
        return self.backend.wait_for_job(model_fingerprint, timeout_s)

    # -- the lease holder's side ---------------------------------------------------------------------------------
    def heartbeat(self, request_id: str, epoch: int, lease_s: float) -> bool:
        """Renew the lease for ``lease_s`` seconds from now; returns whether cancellation was requested."""
        check_lease(lease_s)
        with self.backend.single() as cur:
            row = self.q.one(cur, "heartbeat", request_id=request_id, epoch=epoch, lease_s=lease_s)
            if row is None:
                raise FencedError(request_id, epoch, "heartbeat")
            return bool(row["cancel_requested"])

    def _lock_running(self, cur: Cursor, request_id: str, epoch: int, what: str) -> dict:
        """The job's row, locked, while ``epoch`` holds its lease; FencedError once it does not."""
        row = self.q.one(cur, "lock_running_job", request_id=request_id, epoch=epoch)
        if row is None:
            raise FencedError(request_id, epoch, what)
        return row

    def release(self, request_id: str, epoch: int, reason: str, refund_attempt: bool = True) -> JobView:
        """Give the job back (the runner is shutting down): a queue job is queued again in its old place (with
        its attempt refunded unless told otherwise), a sync job is failed, a cancel-requested one is cancelled."""
        with self.backend.write() as cur:
            row = self._lock_running(cur, request_id, epoch, "release")
            self._end_attempt(cur, request_id, epoch, "released", message=reason)
            if row["cancel_requested"]:
                job = self._finish(cur, request_id, epoch, "IN_PROGRESS", error=cancelled_error())
            elif row["kind"] == "sync":
                job = self._finish(cur, request_id, epoch, "IN_PROGRESS",
                                   error=runner_lost_error(reason, int(row["attempts"])))
            else:
                job = self._requeue_held(cur, request_id, refund=1 if refund_attempt else 0, backoff_s=None)
                self._announce(cur, job.model_fingerprint)
                self._log(cur, request_id, f"{reason}; queued again, it resumes from its last checkpoint", "WARN")
            assert job is not None
            return job

    def _requeue_held(self, cur: Cursor, request_id: str, refund: int, backoff_s: float | None) -> JobView:
        row = self.q.one(cur, "requeue_held_job", request_id=request_id, refund=refund, backoff_s=backoff_s)
        assert row is not None
        return self._view(row)
