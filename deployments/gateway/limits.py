"""Per-key limits, all checked before the Gateway reads a body or writes anything for the request.

- **Job creation** (submit, ``/run``, the Python handle): :func:`admit_job` checks the caps (the queue's length,
  the key's queued or running jobs), then takes a token from the key's *submit* bucket in the jobs database
  (``auth.submit_rate_per_minute``, shared by every Gateway replica). A refusal by a cap costs no token. The store
  checks the caps again, atomically, when it creates the row; a request that loses that race is refused then and
  its stored inputs are deleted.
- **Every other authenticated route** (status, result, stream, cancel, progress, the upload routes) takes a token
  from the key's *request* bucket (:class:`TokenBuckets`, ``auth.request_rate_per_minute``), held in this
  replica's memory: a status poll (fal-client polls 10 times a second) costs no database write. With N Gateway
  replicas a key may make up to N times the budget.
- **SSE status streams**: at most ``auth.max_streams_per_key`` open at once per key on this replica
  (:class:`StreamSlots`); each polls the database 4 times a second while open.

Every refusal is a :class:`LimitError` (429 with ``retry-after``, naming the limit).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from deployments.jobstore import (
    JobStore,
    KeyQueueCapError,
    KeyRunningCapError,
    LimitError,
    QueueFullError,
    RateLimitedError,
)

MAX_TRACKED_KEYS = 4096  # buckets kept in memory; owners come from the configured keys, so this is never reached


def rate_limited(wait_s: float) -> RateLimitedError:
    return RateLimitedError(f"too many requests for this API key; retry in {wait_s:.1f} s", wait_s)


class TokenBuckets:
    """One token bucket per key in memory: ``rate_per_s`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate_per_s, float(burst), clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when), least recently used first

    def take(self, key: str) -> float:
        """Spend one token of ``key``: 0.0, or the seconds until one is there (nothing spent)."""
        now = self.clock()
        tokens, when = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - when) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) > MAX_TRACKED_KEYS:  # a bucket dropped is a full one: drop the oldest
            del self._buckets[next(iter(self._buckets))]
        return 0.0

    def take_or_refuse(self, key: str) -> None:
        wait = self.take(key)
        if wait > 0:
            raise rate_limited(wait)


class StreamCapError(LimitError):
    """The key holds as many open status streams on this replica as it may."""

    error_type = "too_many_streams"


class StreamSlots:
    """Open SSE streams per key on this replica, at most ``per_key`` each."""

    def __init__(self, per_key: int):
        self.per_key = per_key
        self.open: dict[str, int] = {}

    def acquire(self, key: str) -> Callable[[], None]:
        """Take a slot (StreamCapError when none is free); returns its release, which may be called repeatedly."""
        held = self.open.get(key, 0)
        if held >= self.per_key:
            raise StreamCapError(f"this API key already has {held} open status streams on this server (limit "
                                 f"{self.per_key}); close one, or poll the status URL instead")
        self.open[key] = held + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                left = self.open.get(key, 1) - 1
                if left > 0:
                    self.open[key] = left
                else:
                    self.open.pop(key, None)

        return release


async def admit_job(store: JobStore, owner: str, queued: bool, max_queue_length: int | None = None) -> None:
    """Before a job's body is read: its caps (``queued``: the queue's and the key's queued jobs, else the key's
    running jobs), then one token of the key's submit budget. Raises the LimitError that refused it."""
    limits = store.limits
    if queued:
        limit = limits.max_queue_length if max_queue_length is None else min(limits.max_queue_length,
                                                                             max_queue_length)
        total, mine = await asyncio.gather(store.queue_length(), store.queued_count(owner))
        if total >= limit:
            raise QueueFullError(f"the queue holds {total} jobs (limit {limit})")
        if mine >= limits.max_queued_per_owner:
            raise KeyQueueCapError(f"this API key already has {mine} queued jobs (limit "
                                   f"{limits.max_queued_per_owner})")
    elif limits.max_running_per_owner is not None:
        running = await store.running_count(owner)
        if running >= limits.max_running_per_owner:
            raise KeyRunningCapError(f"this API key already has {running} running jobs (limit "
                                     f"{limits.max_running_per_owner})")
    wait = await store.take_token(owner)
    if wait > 0:
        raise rate_limited(wait)
