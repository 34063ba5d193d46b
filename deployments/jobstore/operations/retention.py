"""Retention queries (bounded batches: the sweeper deletes objects first, rows after) and the maintenance leases
that let one process of all sharing the database run a periodic task."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deployments.jobstore.models import ExpiredItem, RetentionKind
from deployments.jobstore.operations.base import StoreBase, check_lease, read_only

MAX_BATCH = 1000  # retention rows per call, keys per named_keys call
EXPIRED_QUERY = {"results": "expired_results", "inputs": "expired_inputs", "checkpoints": "expired_checkpoints",
                 "jobs": "expired_jobs"}
PURGE_QUERY = {"results": "purge_results", "inputs": "purge_inputs", "checkpoints": "purge_checkpoints",
               "jobs": "purge_jobs"}


def _check_kind(kind: str) -> None:
    if kind not in EXPIRED_QUERY:
        raise ValueError(f"retention kind must be one of {sorted(EXPIRED_QUERY)}, got {kind!r}")


class RetentionOps(StoreBase):
    @read_only
    def expired(self, kind: RetentionKind, older_than_s: float, limit: int = 100) -> list[ExpiredItem]:
        """Finished jobs (oldest first, at most ``limit``) whose ``kind`` of objects is older than the TTL, with
        the storage keys to delete. Delete the objects, then call :meth:`purge` with the ids (idempotent: a crash
        in between only repeats the deletes)."""
        _check_kind(kind)
        limit = max(1, min(int(limit), MAX_BATCH))
        with self.backend.read() as cur:
            rows = self.q.all(cur, EXPIRED_QUERY[kind], ttl_s=older_than_s, limit=limit)
        return [ExpiredItem(request_id=r["request_id"], keys=self._keys_owned(kind, r)) for r in rows]

    def _keys_owned(self, kind: str, row: dict[str, Any]) -> list[str]:
        j = self.backend.json_out
        if kind in ("results", "inputs"):
            return list(j(row["keys"]) or [])
        checkpoint = [row["checkpoint_key"]] if row["checkpoint_key"] else []
        if kind == "checkpoints":
            return checkpoint
        inputs = [] if row["inputs_purged"] else list(j(row["input_keys"]) or [])
        results = [] if row["result_purged"] else list(j(row["result_keys"]) or [])
        return inputs + results + checkpoint

    def purge(self, kind: RetentionKind, request_ids: Sequence[str], older_than_s: float) -> int:
        """Mark ``kind`` purged on these jobs (results: the result route answers 410; checkpoints: key cleared), or
        for ``jobs`` delete the rows with their logs, webhooks, attempts and idempotency keys. Re-checks the TTL; returns rows changed."""
        _check_kind(kind)
        ids = list(dict.fromkeys(request_ids))[:MAX_BATCH]
        if not ids:
            return 0
        listed = self.backend.list_in(ids)
        with self.backend.write() as cur:
            if kind != "jobs":
                return self.q.rowcount(cur, PURGE_QUERY[kind], ids=listed, ttl_s=older_than_s)
            gone = [r["request_id"] for r in self.q.all(cur, PURGE_QUERY[kind], ids=listed, ttl_s=older_than_s)]
            if gone:
                for dependent in ("delete_logs_of", "delete_webhooks_of", "delete_attempts_of",
                                  "delete_idempotency_keys_of"):
                    self.q.run(cur, dependent, ids=self.backend.list_in(gone))
            return len(gone)

    @read_only
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
        listed = self.backend.list_in(wanted)
        sources = ["keys_read_by_unfinished"] + ([] if read_by_unfinished_only else ["keys_named_by_rows"])
        with self.backend.read() as cur:
            return {r["key"] for source in sources for r in self.q.all(cur, source, keys=listed)}

    # -- maintenance leases --------------------------------------------------------------------------------------
    def acquire_lease(self, name: str, owner: str, lease_s: float) -> int | None:
        """Take the lease ``name`` for ``lease_s`` seconds if it is free, expired, or already ``owner``'s;
        returns its new epoch (the holder's fencing token), or None while another owner holds it."""
        check_lease(lease_s)
        with self.backend.single() as cur:
            row = self.q.one(cur, "acquire_lease", name=name, owner=owner, lease_s=lease_s)
        return None if row is None else int(row["epoch"])

    def renew_lease(self, name: str, owner: str, epoch: int, lease_s: float) -> bool:
        """Extend the lease by ``lease_s`` from now; False once another owner took it (stop working)."""
        check_lease(lease_s)
        with self.backend.single() as cur:
            return self.q.one(cur, "extend_lease", name=name, owner=owner, epoch=epoch, for_s=lease_s) is not None

    def release_lease(self, name: str, owner: str, epoch: int, keep_s: float = 0.0) -> bool:
        """End the lease ``keep_s`` seconds from now (0: now, the next :meth:`acquire_lease` gets it; more: nobody
        else runs the task before then, e.g. until the next periodic run is due); False if it was not held."""
        if not keep_s >= 0:
            raise ValueError(f"keep_s must be a non-negative number of seconds, got {keep_s!r}")
        with self.backend.single() as cur:
            return self.q.one(cur, "extend_lease", name=name, owner=owner, epoch=epoch, for_s=keep_s) is not None

    @read_only
    def lease_holder(self, name: str) -> dict[str, Any] | None:
        """``owner``, ``epoch`` and ``expires_at`` (database clock) of the lease ``name``, if it was ever taken."""
        with self.backend.read() as cur:
            row = self.q.one(cur, "lease_holder", name=name)
            return None if row is None else dict(row)
