"""``JobStore``: the async face of :class:`SyncJobStore` for Ray Serve replicas.

Both drivers block, so every call runs on the store's own thread pool (sized to its connection pool) and the
event loop only awaits it: no database call ever blocks a replica's loop. Each method has the signature and
meaning of the ``SyncJobStore`` method of the same name. A call whose awaiting task is cancelled still finishes
its transaction in the thread (a submit that committed stays submitted).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from deployments.jobstore.core import SyncJobStore

P = ParamSpec("P")
R = TypeVar("R")


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
    def limits(self):
        return self.sync.limits

    def close(self) -> None:
        """Wait for calls in flight, then close the connections (blocking: call from a thread or at exit)."""
        self._executor.shutdown(wait=True)
        self.sync.close()

    # creation and rate limit
    submit = _in_thread(SyncJobStore.submit)
    create_sync = _in_thread(SyncJobStore.create_sync)
    take_token = _in_thread(SyncJobStore.take_token)
    prune_rate_buckets = _in_thread(SyncJobStore.prune_rate_buckets)
    # reads
    get = _in_thread(SyncJobStore.get)
    position = _in_thread(SyncJobStore.position)
    logs = _in_thread(SyncJobStore.logs)
    status = _in_thread(SyncJobStore.status)
    queue_length = _in_thread(SyncJobStore.queue_length)
    queued_count = _in_thread(SyncJobStore.queued_count)
    running_count = _in_thread(SyncJobStore.running_count)
    # cancel and dispatch
    cancel = _in_thread(SyncJobStore.cancel)
    claim = _in_thread(SyncJobStore.claim)
    expire_leases = _in_thread(SyncJobStore.expire_leases)
    expire_start_deadlines = _in_thread(SyncJobStore.expire_start_deadlines)
    maintain = _in_thread(SyncJobStore.maintain)
    # service-wide values
    ping = _in_thread(SyncJobStore.ping)
    shared_secret = _in_thread(SyncJobStore.shared_secret)
    # fenced runner writes
    heartbeat = _in_thread(SyncJobStore.heartbeat)
    report = _in_thread(SyncJobStore.report)
    log = _in_thread(SyncJobStore.log)
    record_checkpoint = _in_thread(SyncJobStore.record_checkpoint)
    complete = _in_thread(SyncJobStore.complete)
    release = _in_thread(SyncJobStore.release)
    # webhooks
    claim_webhooks = _in_thread(SyncJobStore.claim_webhooks)
    webhook_delivered = _in_thread(SyncJobStore.webhook_delivered)
    webhook_failed = _in_thread(SyncJobStore.webhook_failed)
    webhook_state = _in_thread(SyncJobStore.webhook_state)
    # retention
    expired = _in_thread(SyncJobStore.expired)
    purge = _in_thread(SyncJobStore.purge)
    named_keys = _in_thread(SyncJobStore.named_keys)
    # maintenance leases
    acquire_lease = _in_thread(SyncJobStore.acquire_lease)
    renew_lease = _in_thread(SyncJobStore.renew_lease)
    release_lease = _in_thread(SyncJobStore.release_lease)
    lease_holder = _in_thread(SyncJobStore.lease_holder)
