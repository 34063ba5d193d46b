"""The webhook outbox: a delivery is owed in the transaction that finishes a job with a ``webhook_url``; workers
lease due deliveries, and each attempt's number fences its outcome report."""

from __future__ import annotations

from typing import Any, Literal

from deployments.jobstore.models import WebhookDelivery
from deployments.jobstore.operations.base import StoreBase, read_only


class WebhookOps(StoreBase):
    def claim_webhooks(self, worker_id: str, lease_s: float, limit: int = 10) -> list[WebhookDelivery]:
        """Up to ``limit`` due deliveries, leased to ``worker_id``: no other caller gets them until the lease runs
        out (then they are due again). Each claim counts an attempt; ``attempt`` fences the outcome report."""
        with self.backend.write() as cur:
            out = []
            for due in self.q.all(cur, "due_webhooks", limit=limit):
                row = self.q.one(cur, "lease_webhook", request_id=due["request_id"], worker_id=worker_id,
                                 lease_s=lease_s)
                assert row is not None
                out.append(WebhookDelivery(request_id=row["request_id"], owner=row["owner"] or "", url=row["url"],
                                           attempt=int(row["attempts"]),
                                           lease_expires_at=float(row["lease_expires_at"])))
            return out

    def _settle(self, request_id: str, attempt: int, state: Literal["pending", "delivered", "failed"],
                error: str | None, retry_in_s: float | None, message: str | None, level: str) -> bool:
        with self.backend.write() as cur:
            row = self.q.one(cur, "settle_webhook", request_id=request_id, attempt=attempt, state=state,
                             error=error, retry_in_s=retry_in_s)
            if row is not None and message:
                self._log(cur, request_id, message, level)
            return row is not None

    def webhook_delivered(self, request_id: str, attempt: int, message: str | None = None) -> bool:
        """Record a successful delivery (and log ``message`` on the job); False if the lease was lost."""
        return self._settle(request_id, attempt, "delivered", None, None, message, "INFO")

    def webhook_failed(self, request_id: str, attempt: int, error: str, retry_in_s: float | None = None,
                       message: str | None = None) -> bool:
        """Record a failed attempt: due again in ``retry_in_s`` seconds, or given up for good when None."""
        if retry_in_s is None:
            return self._settle(request_id, attempt, "failed", error, None, message, "ERROR")
        return self._settle(request_id, attempt, "pending", error, retry_in_s, message, "WARN")

    @read_only
    def webhook_state(self, request_id: str) -> dict[str, Any] | None:
        """``state`` (pending/delivered/failed), ``attempts`` and ``last_error`` of a job's webhook."""
        with self.backend.read() as cur:
            row = self.q.one(cur, "webhook_state", request_id=request_id)
            return None if row is None else dict(row)
