"""Limits shared by every process on the database (a token bucket per API key), and service-wide values."""

from __future__ import annotations

import re
import secrets

from deployments.jobstore.backend import Cursor
from deployments.jobstore.errors import RateLimitedError
from deployments.jobstore.operations.base import StoreBase, read_only

_SECRET_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


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
