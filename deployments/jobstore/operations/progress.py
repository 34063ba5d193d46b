"""What a lease holder reports while it runs: stage, progress and log lines, fenced by its epoch."""

from __future__ import annotations

from deployments.jobstore.errors import FencedError
from deployments.jobstore.operations.base import StoreBase, log_entry


class ProgressOps(StoreBase):
    def report(self, request_id: str, epoch: int, *, stage: str | None = None, progress: float | None = None,
               message: str | None = None, level: str = "INFO", lease_s: float | None = None) -> bool:
        """Stage/progress (and optionally a log line and a lease renewal) in one write; returns cancel_requested."""
        if progress is not None:
            progress = max(0.0, min(1.0, float(progress)))
        entries = [log_entry(message, level)] if message else []
        with self.backend.write() if entries else self.backend.single() as cur:
            row = self.q.one(cur, "report_progress", request_id=request_id, epoch=epoch, stage=stage,
                             progress=progress, lease_s=lease_s, lines=len(entries))
            if row is None:
                raise FencedError(request_id, epoch, "progress")
            self._append_logs(cur, request_id, entries, int(row["log_seq"]))
            return bool(row["cancel_requested"])

    def log(self, request_id: str, epoch: int, message: str, level: str = "INFO") -> bool:
        """Append a log line as the lease holder; returns cancel_requested."""
        entries = [log_entry(message, level)]
        with self.backend.write() as cur:
            row = self.q.one(cur, "report_progress", request_id=request_id, epoch=epoch, stage=None, progress=None,
                             lease_s=None, lines=1)
            if row is None:
                raise FencedError(request_id, epoch, "log")
            self._append_logs(cur, request_id, entries, int(row["log_seq"]))
            return bool(row["cancel_requested"])
