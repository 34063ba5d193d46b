"""The Postprocessor's request router: one video segment per replica at a time, so segments spread and autoscale.

A long video's segments are sent all at once (``finish_segment``, :mod:`deployments.orchestrator.segments`). Serve's
default router would put a second segment on a replica that is still decoding the first (it accepts calls up to
``max_ongoing_requests``, which stays above one so that readiness probes answer during a decode), and the two would
run one after the other while another replica idles. This router gives a segment only to a replica with nothing in
flight; when none is idle the segment waits in the router, under Serve's back-off, where the handle counts it as
an ongoing request: with ``target_ongoing_requests: 1`` autoscaling asks for one replica per segment in flight, and
each new replica takes a waiting segment as soon as the router sees it. Every other call (the serial ``finish`` of
a short video, ``stitch``, readiness probes) goes to the least loaded replica, as Serve's default does.

"Idle": no segment this router handed the replica is still in flight (counted from the moment the router hands it
out until Serve reports the call completed, however it ended), and the router's queue-length cache does not say the
replica is busy (refreshed by every accepted call's answer and by probes; a replica without a fresh entry is a
candidate that Serve probes first, with its growing deadlines: a loaded replica may miss the first). The count is
what makes it exact: a probe answered before a segment arrived can overwrite the cache with a stale 0 after it did.
Several Orchestrator replicas each have a router and know only the cache of one another's segments; where they meet
on one replica the Postprocessor runs their segments one after the other (its decode lock): slower, never wrong.

The chosen replica goes to the oldest pending call it suits (the same reason as the Denoisers' router,
:mod:`deployments.workers.placement`: all calls of one Orchestrator job share Serve's internal request id).
"""

from __future__ import annotations

from collections import Counter

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

SEGMENT_METHOD = "finish_segment"


def is_segment(pending: PendingRequest) -> bool:
    return pending.metadata.call_method == SEGMENT_METHOD


class SegmentRouter(RequestRouter):
    """Segments to idle replicas only (back-off while there is none); other calls to the least loaded."""

    @property
    def _segments(self) -> Counter[tuple[str, str]]:
        """Segments in flight per (replica, internal request id): an entry lives from the hand-out to the call's
        completion (or the replica's death), so the table holds at most the segments in flight."""
        table = getattr(self, "_segments_in_flight", None)  # Serve builds routers without our __init__
        if table is None:
            table = self._segments_in_flight = Counter()
        return table

    def _has_segment(self, replica: RunningReplica) -> bool:
        unique = replica.replica_id.unique_id
        return any(key[0] == unique for key in self._segments)

    def _idle(self, replica: RunningReplica) -> bool:
        return not self._has_segment(replica) and self._replica_queue_len_cache.get(replica.replica_id) == 0

    def _maybe_idle(self, replica: RunningReplica) -> bool:
        return not self._has_segment(replica) and self._replica_queue_len_cache.get(replica.replica_id) in (0, None)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is None:
            return [candidate_replicas]
        pending_request.routing_context.should_backoff = True  # never re-ask without sleeping
        if not is_segment(pending_request):
            return [candidate_replicas]
        return [[r for r in candidate_replicas if self._maybe_idle(r)]]  # unknown ones: probed by Serve

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        idle = self._idle(replica)
        for pending in self._pending_requests_to_fulfill:  # oldest first; finished ones are skipped
            if pending.future.done() or (is_segment(pending) and not idle):
                continue
            self._cancel_routing_task_for_pending_request(pending)
            self._record_queue_wait_time(pending)
            if is_segment(pending):
                self._segments[(replica.replica_id.unique_id, pending.metadata.internal_request_id)] += 1
            pending.future.set_result(replica)
            self._remove_pending_request_from_indices(pending)
            return

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        key = (replica_id.unique_id, internal_request_id)
        if self._segments[key] > 1:
            self._segments[key] -= 1
        else:
            self._segments.pop(key, None)

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        for key in [k for k in self._segments if k[0] == replica_id.unique_id]:
            del self._segments[key]
