"""Limits shared by every process on the database (a token bucket per API key, the bytes of uploads each key
holds), and service-wide values."""

from __future__ import annotations

import re
import secrets

from deployments.jobstore.backend import Cursor
from deployments.jobstore.errors import RateLimitedError, UploadQuotaError
from deployments.jobstore.operations.base import StoreBase, read_only

_SECRET_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
PRUNE_PER_UPLOAD = 8  # expired usage rows each reservation removes
PRUNE_BATCH = 1000


class LimitOps(StoreBase):
    def _rate_limit(self, cur: Cursor, owner: str) -> None:
        """Take a token from ``owner``'s bucket inside the caller's transaction; RateLimitedError when none is
        left (the transaction rolls back, so a refusal spends nothing)."""
        rate = self.limits.rate_per_s
        row = self.q.one(cur, "take_rate_token", owner=owner, burst=float(self.limits.rate_burst), rate=rate)
        assert row is not None
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
        with self.backend.single() as cur:
            return self.q.rowcount(cur, "prune_rate_buckets", idle_s=self.limits.rate_burst / self.limits.rate_per_s)

    @read_only
    def ping(self) -> bool:
        """One round trip (readiness checks)."""
        with self.backend.read() as cur:
            return self.q.one(cur, "ping") is not None

    def shared_secret(self, name: str) -> str:
        """The secret called ``name``, created on first use with insert-if-absent: every process sharing the
        database (Gateways, dispatchers, applications) gets the same value, whoever asks first. It lives in the
        database only, never in storage where a public link could reach it."""
        if not isinstance(name, str) or not _SECRET_NAME.fullmatch(name):
            raise ValueError(f"secret name must be lowercase letters, digits, '_', '.' or '-', got {name!r}")
        with self.backend.write() as cur:
            self.q.run(cur, "create_secret", name=name, value=secrets.token_urlsafe(32))
            row = self.q.one(cur, "read_secret", name=name)
            assert row is not None
            return str(row["value"])

    # -- upload quota --------------------------------------------------------------------------------------------
    def reserve_upload(self, owner: str, key: str, size_bytes: int) -> int:
        """Count ``size_bytes`` (the upload's declared size, or the per-upload bound when it is unknown) against
        ``owner``'s quota before any byte is read, under a per-key lock shared by every Gateway: returns the bytes
        the key then holds; UploadQuotaError (429, nothing reserved) when that would pass
        ``JobLimits.upload_quota_bytes``. Settle it with :meth:`settle_upload` once stored or failed. An upload's
        bytes count until ``JobLimits.upload_ttl_s`` after the reservation (when retention deletes it)."""
        if not isinstance(size_bytes, int) or size_bytes < 0:
            raise ValueError(f"size_bytes must be a non-negative integer, got {size_bytes!r}")
        quota = self.limits.upload_quota_bytes
        with self.backend.write() as cur:
            self.backend.lock(cur, f"upload:{owner}")
            held = self.q.count(cur, "upload_bytes_held", owner=owner)
            if quota is not None and held + size_bytes > quota:
                raise UploadQuotaError(f"this API key holds {held} bytes of uploads; {size_bytes} more would pass "
                                       f"its quota of {quota} bytes (uploads are kept "
                                       f"{self.limits.upload_ttl_s / 3600:g} h)")
            self.q.run(cur, "reserve_upload", key=key, owner=owner, bytes=size_bytes, ttl_s=self.limits.upload_ttl_s)
            self.q.run(cur, "prune_upload_usage", limit=PRUNE_PER_UPLOAD)
            return held + size_bytes

    def settle_upload(self, key: str, size_bytes: int) -> None:
        """The upload ``key`` is stored with ``size_bytes`` (its real size; 0: it failed and nothing is kept)."""
        if not isinstance(size_bytes, int) or size_bytes < 0:
            raise ValueError(f"size_bytes must be a non-negative integer, got {size_bytes!r}")
        with self.backend.single() as cur:
            self.q.run(cur, "settle_upload" if size_bytes else "forget_upload", key=key, bytes=size_bytes)

    @read_only
    def upload_usage(self, owner: str) -> int:
        """Bytes of uploads ``owner`` holds in storage now (reserved or stored, not yet expired)."""
        with self.backend.read() as cur:
            return self.q.count(cur, "upload_bytes_held", owner=owner)

    def prune_upload_usage(self, limit: int = PRUNE_BATCH) -> int:
        """Delete up to ``limit`` rows of expired uploads (the retention sweep; reservations prune a few)."""
        with self.backend.single() as cur:
            return self.q.rowcount(cur, "prune_upload_usage", limit=max(1, min(int(limit), PRUNE_BATCH)))
