"""What the job store refuses, as distinct exceptions so the HTTP layer can say which limit was hit."""

from __future__ import annotations


class JobStoreError(Exception):
    """Base of everything the store raises on purpose (driver errors pass through unchanged)."""


class LimitError(JobStoreError):
    """A submit or sync creation was refused by a limit (HTTP 429); ``message`` is safe to show the client."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # picklable with every field: Ray carries it from the Orchestrator to the Gateway
        return type(self), (self.message,)


class QueueFullError(LimitError):
    """The whole queue holds as many jobs as the server (or the caller's ``fal_max_queue_length``) allows."""


class KeyQueueCapError(LimitError):
    """This API key already has as many queued jobs as one key may have."""


class UploadQuotaError(LimitError):
    """This API key's uploads would hold more bytes in storage than its quota allows."""


class KeyRunningCapError(LimitError):
    """This API key already has as many running jobs (queued and sync) as one key may have."""


class RateLimitedError(LimitError):
    """The key submitted faster than its rate; ``retry_after_s`` says when the next submit is allowed."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return type(self), (self.message, self.retry_after_s)


class FencedError(JobStoreError):
    """A runner wrote with an epoch that no longer holds the job's lease (reclaimed, finished, or cancelled and
    finished): it must stop working on the job and delete any object it wrote under its own epoch."""

    def __init__(self, request_id: str, epoch: int, what: str):
        super().__init__(f"job {request_id} epoch {epoch}: {what} refused, this runner no longer holds the lease")
        self.request_id, self.epoch, self.what = request_id, epoch, what

    def __reduce__(self):
        return type(self), (self.request_id, self.epoch, self.what)


class MigrationError(JobStoreError):
    """The database holds a schema this code does not know (a newer version), or a migration failed."""


class NotDeadLetteredError(JobStoreError):
    """``requeue`` was asked for a job that is not a dead letter (or whose inputs retention already deleted)."""

    def __init__(self, request_id: str):
        super().__init__(f"job {request_id} is not a dead letter that can be re-queued (not found, not failed out "
                         "of attempts, or its inputs were already deleted by retention)")
        self.request_id = request_id

    def __reduce__(self):
        return type(self), (self.request_id,)


class IdempotencyKeyReusedError(JobStoreError):
    """An Idempotency-Key this API key already used, within its window, for a request with another body (HTTP
    422: a client bug, never retried)."""

    def __init__(self, key: str):
        super().__init__(f"the Idempotency-Key {key!r} was already used with a different request body")
        self.key = key

    def __reduce__(self):
        return type(self), (self.key,)


class AlreadySubmittedError(JobStoreError):
    """A sync request repeated with the same Idempotency-Key and body: job ``request_id`` already runs (or ran)
    for it; wait for that one's result instead of starting another."""

    def __init__(self, request_id: str):
        super().__init__(f"this Idempotency-Key already started job {request_id}")
        self.request_id = request_id

    def __reduce__(self):
        return type(self), (self.request_id,)
