"""Idempotency keys: a retried submit (a client retrying after a 5xx or a time-out) returns the job the first one
created instead of queueing a second GPU job. A key is scoped to its owner and answers for
``JobLimits.idempotency_ttl_s``; expired keys are pruned a few at a time by keyed submits and in bulk by the
retention sweep, and go with their job's row."""

from __future__ import annotations

import re

from deployments.jobstore.backend import Cursor
from deployments.jobstore.errors import IdempotencyKeyReusedError
from deployments.jobstore.operations.base import StoreBase, read_only

_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII without spaces, as HTTP header values allow
_BODY_HASH = re.compile(r"[0-9a-f]{64}")
PRUNE_PER_SUBMIT = 8  # expired keys each keyed submit removes: the table cannot outgrow the live keys for long
PRUNE_BATCH = 1000


def check_idempotency(key: str | None, body_hash: str | None) -> None:
    if key is None and body_hash is None:
        return
    if key is None or not _KEY.fullmatch(key):
        raise ValueError(f"idempotency_key must be 1-255 printable ASCII characters, got {key!r}")
    if body_hash is None or not _BODY_HASH.fullmatch(body_hash):
        raise ValueError("body_hash must be the sha256 hex digest of the request body, got "
                         f"{body_hash!r}")


class IdempotencyOps(StoreBase):
    def _earlier_request(self, cur: Cursor, owner: str, key: str, body_hash: str) -> str | None:
        """The job ``key`` created within its window (None: none); IdempotencyKeyReusedError when that was a
        request with another body."""
        row = self.q.one(cur, "idempotency_key", owner=owner, key=key)
        if row is None:
            return None
        if row["body_hash"] != body_hash:
            raise IdempotencyKeyReusedError(key)
        return str(row["request_id"])

    @read_only
    def idempotent_request(self, owner: str, key: str) -> tuple[str, str] | None:
        """``(request_id, body_hash)`` of the job ``owner``'s ``key`` created within its window, or None, without
        creating anything: a Gateway answers a retry with it before it checks a limit, takes a token or reads more
        than the body (a replay is neither charged nor refused at a cap; compare the body's hash: another body is a
        422). A first request passes its key to :meth:`submit`, which settles concurrent retries under its lock."""
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(f"idempotency_key must be 1-255 printable ASCII characters, got {key!r}")
        with self.backend.read() as cur:
            row = self.q.one(cur, "idempotency_key", owner=owner, key=key)
        return None if row is None else (str(row["request_id"]), str(row["body_hash"]))

    def _remember(self, cur: Cursor, owner: str, key: str, body_hash: str, request_id: str) -> None:
        self.q.run(cur, "remember_idempotency_key", owner=owner, key=key, body_hash=body_hash, request_id=request_id,
                   ttl_s=self.limits.idempotency_ttl_s)
        self.q.run(cur, "prune_idempotency_keys", limit=PRUNE_PER_SUBMIT)

    def prune_idempotency_keys(self, limit: int = PRUNE_BATCH) -> int:
        """Delete up to ``limit`` expired idempotency keys (the retention sweep); returns how many."""
        with self.backend.single() as cur:
            return self.q.rowcount(cur, "prune_idempotency_keys", limit=max(1, min(int(limit), PRUNE_BATCH)))
