"""What a lease holder reports while it runs: stage, progress and log lines, fenced by its epoch.

Each call is one transaction, and on a durable database each commit is a disk flush: a runner that buffers its
lines and writes them with :meth:`ProgressOps.log_batch` pays one commit per batch instead of one per line
(``bench/results/job_store.txt``).
"""

from __future__ import annotations

from collections.abc import Sequence

from deployments.jobstore.errors import FencedError
from deployments.jobstore.operations.base import StoreBase, log_entry
from deployments.jobstore.shapes import LogEntry

MAX_BATCH_LINES = 1000


class ProgressOps(StoreBase):
    def report(self, request_id: str, epoch: int, *, stage: str | None = None, progress: float | None = None,
               message: str | None = None, level: str = "INFO", lease_s: float | None = None) -> bool:
        """Stage/progress (and optionally a log line and a lease renewal) in one write; returns cancel_requested."""
        entries = [log_entry(message, level)] if message else []
        return self._write(request_id, epoch, "progress", entries, stage, progress, lease_s)

    def log(self, request_id: str, epoch: int, message: str, level: str = "INFO") -> bool:
        """Append a log line as the lease holder; returns cancel_requested."""
        return self._write(request_id, epoch, "log", [log_entry(message, level)])

    def log_batch(self, request_id: str, epoch: int, lines: Sequence[LogEntry], *, stage: str | None = None,
                  progress: float | None = None, lease_s: float | None = None) -> bool:
        """Several log lines (in order, with their level and source; the stored time is the database's clock at
        the write) and optionally stage, progress and a lease renewal, in one transaction; returns
        cancel_requested."""
        if len(lines) > MAX_BATCH_LINES:
            raise ValueError(f"log_batch takes at most {MAX_BATCH_LINES} lines, got {len(lines)}")
        return self._write(request_id, epoch, "log", list(lines), stage, progress, lease_s)

    def _write(self, request_id: str, epoch: int, what: str, entries: list[LogEntry], stage: str | None = None,
               progress: float | None = None, lease_s: float | None = None) -> bool:
        if progress is not None:
            progress = max(0.0, min(1.0, float(progress)))
        with self.backend.write() if entries else self.backend.single() as cur:
            row = self.q.one(cur, "report_progress", request_id=request_id, epoch=epoch, stage=stage,
                             progress=progress, lease_s=lease_s, lines=len(entries))
            if row is None:
                raise FencedError(request_id, epoch, what)
            self._append_logs(cur, request_id, entries, int(row["log_seq"]))
            return bool(row["cancel_requested"])
