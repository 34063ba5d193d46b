"""Limits shared by every process on the database (a token bucket per API key, the bytes of uploads each key
holds), and service-wide values."""

from __future__ import annotations

import re
import secrets

from deployments.jobstore.backend import Cursor
from deployments.jobstore.errors import RateLimitedError, UploadQuotaError
from deployments.jobstore.models import UploadUsage
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
    def reserve_upload(self, owner: str, key: str, size_bytes: int, fit: bool = False) -> int:
        """Count ``size_bytes`` (the upload's declared size; ``fit``: its size is unknown, reserve as much of
        ``size_bytes`` as the quota leaves) against ``owner``'s quota before any byte is read, under a per-key lock
        shared by every Gateway; returns the bytes reserved (what the body may carry). UploadQuotaError (nothing
        reserved) when they would pass ``JobLimits.upload_quota_bytes`` or the key already holds
        ``max_uploads_per_owner`` uploads. Settle it with :meth:`settle_upload` once stored or failed; unsettled,
        it counts for ``upload_hold_s``."""
        if not isinstance(size_bytes, int) or size_bytes < 0:
            raise ValueError(f"size_bytes must be a non-negative integer, got {size_bytes!r}")
        limits = self.limits
        with self.backend.write() as cur:
            self.backend.lock(cur, f"upload:{owner}")
            usage = self._upload_usage(cur, owner)
            left = None if limits.upload_quota_bytes is None else limits.upload_quota_bytes - usage.bytes
            if left is not None and fit:
                size_bytes = min(size_bytes, left)
            kept = f"(uploads are kept {limits.upload_ttl_s / 3600:g} h)"
            if limits.max_uploads_per_owner is not None and usage.uploads >= limits.max_uploads_per_owner:
                raise UploadQuotaError(f"this API key holds {usage.uploads} uploads, its limit {kept}")
            if left is not None and (size_bytes > left or left <= 0):
                raise UploadQuotaError(f"this API key holds {usage.bytes} bytes of uploads; {size_bytes} more would "
                                       f"pass its quota of {limits.upload_quota_bytes} bytes {kept}")
            self.q.run(cur, "reserve_upload", key=key, owner=owner, bytes=size_bytes,
                       hold_s=min(limits.upload_hold_s, limits.upload_ttl_s))
            self.q.run(cur, "prune_upload_usage", limit=PRUNE_PER_UPLOAD)
            return size_bytes

    def settle_upload(self, owner: str, key: str, size_bytes: int) -> None:
        """The upload ``key`` is stored with ``size_bytes`` (its real size; 0: it failed and nothing is kept),
        counted from now until ``JobLimits.upload_ttl_s`` after its reservation (when retention deletes it)."""
        if not isinstance(size_bytes, int) or size_bytes < 0:
            raise ValueError(f"size_bytes must be a non-negative integer, got {size_bytes!r}")
        with self.backend.single() as cur:
            if size_bytes:
                self.q.run(cur, "settle_upload", key=key, owner=owner, bytes=size_bytes,
                           ttl_s=self.limits.upload_ttl_s)
            else:
                self.q.run(cur, "forget_upload", key=key)

    @read_only
    def upload_usage(self, owner: str) -> UploadUsage:
        """What ``owner``'s live uploads hold now (reserved or stored, not yet expired)."""
        with self.backend.read() as cur:
            return self._upload_usage(cur, owner)

    def _upload_usage(self, cur: Cursor, owner: str) -> UploadUsage:
        row = self.q.one(cur, "upload_usage_of", owner=owner)
        assert row is not None
        return UploadUsage(bytes=int(row["bytes"]), uploads=int(row["uploads"]))

    def prune_upload_usage(self, limit: int = PRUNE_BATCH) -> int:
        """Delete up to ``limit`` rows of expired uploads (the retention sweep; reservations prune a few)."""
        with self.backend.single() as cur:
            return self.q.rowcount(cur, "prune_upload_usage", limit=max(1, min(int(limit), PRUNE_BATCH)))
