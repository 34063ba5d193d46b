"""The store: every operation, blocking (:class:`SyncJobStore`) or awaited (:class:`JobStore`).

Both drivers block, so the async store runs every call on its own thread pool (sized to the connection pool) and
the event loop only awaits it: no database call ever blocks a replica's loop. Each ``JobStore`` method has the
signature and meaning of the ``SyncJobStore`` method of the same name. A call whose awaiting task is cancelled
still finishes its transaction in the thread (a submit that committed stays submitted).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from deployments.jobstore.models import JobLimits
from deployments.jobstore.operations.base import check_timeout
from deployments.jobstore.operations.progress import ProgressOps
from deployments.jobstore.operations.queue import QueueOps
from deployments.jobstore.operations.results import ResultOps
from deployments.jobstore.operations.retention import RetentionOps
from deployments.jobstore.operations.retries import RetryOps
from deployments.jobstore.operations.webhooks import WebhookOps

R = TypeVar("R")


class SyncJobStore(QueueOps, ResultOps, RetryOps, ProgressOps, WebhookOps, RetentionOps):
    """All operations, blocking. Every state change is one transaction; thread-safe (a pooled connection per
    call)."""


def _in_thread(method: Callable[..., R]) -> Callable[..., Coroutine[Any, Any, R]]:
    @functools.wraps(method)
    async def run(self: JobStore, *args: Any, **kwargs: Any) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(method, self.sync, *args, **kwargs))

    return run


class JobStore:
    """Async job store; ``sync`` is the blocking store underneath (for threads, scripts and tests)."""

    def __init__(self, sync: SyncJobStore):
        self.sync = sync
        self._executor = ThreadPoolExecutor(max_workers=sync.backend.max_connections,
                                            thread_name_prefix=f"jobstore-{sync.backend.name}")

    @property
    def backend_name(self) -> str:
        return self.sync.backend.name

    @property
    def limits(self) -> JobLimits:
        return self.sync.limits

    def close(self) -> None:
        """Wait for calls in flight, then close the connections (blocking: call from a thread or at exit)."""
        self._executor.shutdown(wait=True)
        self.sync.close()

    # submit and queue reads
    submit = _in_thread(SyncJobStore.submit)
    create_sync = _in_thread(SyncJobStore.create_sync)
    get = _in_thread(SyncJobStore.get)
    position = _in_thread(SyncJobStore.position)
    logs = _in_thread(SyncJobStore.logs)
    status = _in_thread(SyncJobStore.status)
    attempts = _in_thread(SyncJobStore.attempts)
    queue_length = _in_thread(SyncJobStore.queue_length)
    queued_count = _in_thread(SyncJobStore.queued_count)
    running_count = _in_thread(SyncJobStore.running_count)
    cancel = _in_thread(SyncJobStore.cancel)
    idempotent_request = _in_thread(SyncJobStore.idempotent_request)
    # claims, leases and fencing
    claim = _in_thread(SyncJobStore.claim)
    expire_leases = _in_thread(SyncJobStore.expire_leases)
    expire_start_deadlines = _in_thread(SyncJobStore.expire_start_deadlines)
    maintain = _in_thread(SyncJobStore.maintain)
    heartbeat = _in_thread(SyncJobStore.heartbeat)

    async def wait_for_job(self, timeout_s: float, model_fingerprint: str = "") -> bool:
        """:meth:`SyncJobStore.wait_for_job` without holding a thread of the pool while it waits."""
        check_timeout(timeout_s)
        return await self.sync.backend.wait_for_job_async(model_fingerprint, timeout_s)

    release = _in_thread(SyncJobStore.release)
    # retries and dead letters
    retry = _in_thread(SyncJobStore.retry)
    dead_letters = _in_thread(SyncJobStore.dead_letters)
    requeue = _in_thread(SyncJobStore.requeue)
    retarget = _in_thread(SyncJobStore.retarget)
    # progress and logs
    report = _in_thread(SyncJobStore.report)
    log = _in_thread(SyncJobStore.log)
    log_batch = _in_thread(SyncJobStore.log_batch)
    # results and checkpoints
    complete = _in_thread(SyncJobStore.complete)
    record_checkpoint = _in_thread(SyncJobStore.record_checkpoint)
    completion = _in_thread(SyncJobStore.completion)
    # webhooks
    claim_webhooks = _in_thread(SyncJobStore.claim_webhooks)
    webhook_delivered = _in_thread(SyncJobStore.webhook_delivered)
    webhook_failed = _in_thread(SyncJobStore.webhook_failed)
    webhook_state = _in_thread(SyncJobStore.webhook_state)
    # retention and maintenance leases
    expired = _in_thread(SyncJobStore.expired)
    purge = _in_thread(SyncJobStore.purge)
    named_keys = _in_thread(SyncJobStore.named_keys)
    acquire_lease = _in_thread(SyncJobStore.acquire_lease)
    renew_lease = _in_thread(SyncJobStore.renew_lease)
    release_lease = _in_thread(SyncJobStore.release_lease)
    lease_holder = _in_thread(SyncJobStore.lease_holder)
    # limits and service-wide values
    take_token = _in_thread(SyncJobStore.take_token)
    prune_rate_buckets = _in_thread(SyncJobStore.prune_rate_buckets)
    prune_idempotency_keys = _in_thread(SyncJobStore.prune_idempotency_keys)
    reserve_upload = _in_thread(SyncJobStore.reserve_upload)
    settle_upload = _in_thread(SyncJobStore.settle_upload)
    upload_usage = _in_thread(SyncJobStore.upload_usage)
    prune_upload_usage = _in_thread(SyncJobStore.prune_upload_usage)
    ping = _in_thread(SyncJobStore.ping)
    shared_secret = _in_thread(SyncJobStore.shared_secret)
