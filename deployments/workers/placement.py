"""Balanced, sticky placement of units on Denoiser replicas, through Ray Serve's request router API.

Every Denoiser method takes ``(request_id, slot, ...)`` as its first two positional arguments, and
:class:`StickyBalancedRouter` sends the call to ``sorted(live replicas)[slot mod N]`` (sorted by replica id). The
Ray executor gives unit ``i`` of a step the slot ``offset(request) + i``, so:

* **balanced**: the U units of a step land on the N live replicas ``ceil(U/N)`` or ``floor(U/N)`` each;
* **sticky**: unit ``i`` is the same (window, guidance rows) at every step, so it goes to the same replica from step
  to step while the replica set is stable; that replica keeps the request's conditioning and the unit's step-cache
  residual;
* **adaptive**: after a replica death or a scale event the next routing sees the new list (``slot mod N'``). A unit
  that moved finds a cold cache there and rebuilds what it needs from its anchor latents: it costs time, never bits;
* ``offset(request)`` is a stable hash of the request id, so the first units of concurrent short jobs do not all
  start on the same replica.

Why it cannot busy-loop (see ``ray/serve/_private/request_router/request_router.py``): the base router asks
``choose_replicas`` again at once, without sleeping, unless ``pending_request.routing_context.should_backoff`` is
set; a failed queue-length probe (0.1 s deadline, easily missed on a loaded CPU) then re-asks in a tight loop. This
router always sets it, so every further attempt waits the configured exponential back-off (up to
``max_backoff_s``). And the Denoiser accepts up to ``max_ongoing_requests`` (64) units per replica, far more than
run at once, so a replica practically never rejects a unit: units wait inside the replica on its GPU queue
(:mod:`deployments.workers.unit_queue`, round-robin across requests), the queue length comes back with every accepted call
and stays cached, and no probe is sent on the hot path. A replica that is full anyway (more than 64 units of
concurrent jobs) is retried after the back-off, never replaced by another replica: stickiness holds.

Which pending call gets a chosen replica: Serve's default matches the routing task's call by its internal request
id, but every call made while a replica serves one request (all the units of one Orchestrator job) shares that id,
so only the first of them would ever be matched and the rest would be re-routed forever. Serve's ``FIFOMixin``
hands the replica to the oldest pending call instead, whichever replica that call is placed on, which breaks
stickiness. So the router gives a chosen replica to the oldest pending call *placed on it* (it overrides the same
hook ``FIFOMixin`` does, ``_fulfill_next_pending_request``; Ray is pinned, and ``tests/test_placement.py`` routes
real calls through it). Calls that do not carry ``(str, int)`` leading arguments (a readiness probe) may go to any
replica, the least loaded first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

T = TypeVar("T")
def placement_slot(args: Sequence[object]) -> int | None:
    """The slot of a Denoiser call from its positional arguments ``(request_id, slot, ...)``, or ``None``."""
    if len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], int) and not isinstance(args[1], bool):
        return args[1]
    return None


def place(slot: int, replicas: Sequence[T], key=lambda r: r) -> T:
    """``sorted(replicas, key)[slot mod N]``: the replica of ``slot`` among the live ones."""
    if not replicas:
        raise ValueError("no replica to place on")
    ordered = sorted(replicas, key=key)
    return ordered[slot % len(ordered)]


def replica_key(replica: RunningReplica) -> str:
    return replica.replica_id.unique_id


class StickyBalancedRouter(RequestRouter):
    """``choose_replicas``: the replica of the call's slot (one rank, one replica); back-off between attempts.
    A chosen replica goes to the oldest pending call placed on it."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is None:
            return [candidate_replicas]
        pending_request.routing_context.should_backoff = True  # never re-ask without sleeping
        slot = placement_slot(pending_request.args)
        if slot is None:
            return [candidate_replicas]  # no placement asked for: the least loaded of all
        return [[place(slot, candidate_replicas, replica_key)]]

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        ordered = sorted(self._replicas_list, key=replica_key)
        for pending in self._pending_requests_to_fulfill:  # oldest first; finished ones are skipped
            if pending.future.done():
                continue
            slot = placement_slot(pending.args)
            if slot is not None and (not ordered or replica_key(ordered[slot % len(ordered)]) != replica_key(replica)):
                continue
            self._cancel_routing_task_for_pending_request(pending)
            self._record_queue_wait_time(pending)
            pending.future.set_result(replica)
            self._remove_pending_request_from_indices(pending)
            return
