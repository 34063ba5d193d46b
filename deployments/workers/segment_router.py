"""The Postprocessor's request router: one video segment per replica at a time, so segments spread and autoscale.

A long video's segments are sent all at once (``finish_segment``, :mod:`deployments.orchestrator.segments`). Serve's
default router would put a second segment on a replica that is still decoding the first (it accepts calls up to
``max_ongoing_requests``, which stays above one so that readiness probes answer during a decode), and the two would
run one after the other while another replica idles. This router gives a segment only to a replica with nothing in
flight; when none is idle the segment waits in the router, under Serve's back-off, where the handle counts it as
an ongoing request: with ``target_ongoing_requests: 1`` autoscaling asks for one replica per segment in flight, and
each new replica takes a waiting segment as soon as the router sees it. Every other call (the serial ``finish`` of
a short video, ``stitch``, readiness probes) goes to the least loaded replica, as Serve's default does.

"Idle" is the router's queue-length cache (refreshed by every accepted call's answer and by probes; a replica with
no fresh entry is probed first). A replica handed a segment counts as busy at once, before the call is sent, so two
segments being routed at the same moment never pick the same idle replica. Several Orchestrator replicas each have
a router and may still meet on one replica; the Postprocessor then runs their segments one after the other (its
decode lock): slower, never wrong.

The chosen replica goes to the oldest pending call it suits (the same reason as the Denoisers' router,
:mod:`deployments.workers.placement`: all calls of one Orchestrator job share Serve's internal request id).
"""

from __future__ import annotations

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

SEGMENT_METHOD = "finish_segment"


def is_segment(pending: PendingRequest) -> bool:
    return pending.metadata.call_method == SEGMENT_METHOD


class SegmentRouter(RequestRouter):
    """Segments to idle replicas only (back-off while there is none); other calls to the least loaded."""

    def _idle(self, replica: RunningReplica) -> bool:
        return self._replica_queue_len_cache.get(replica.replica_id) == 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is None:
            return [candidate_replicas]
        pending_request.routing_context.should_backoff = True  # never re-ask without sleeping
        if not is_segment(pending_request):
            return [candidate_replicas]
        unknown = [r for r in candidate_replicas if self._replica_queue_len_cache.get(r.replica_id) is None]
        if unknown:
            await self._probe_queue_lens(unknown, 0)  # fills the cache (a replica that does not answer stays out)
        return [[r for r in candidate_replicas if self._idle(r)]]

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        idle = self._idle(replica)
        for pending in self._pending_requests_to_fulfill:  # oldest first; finished ones are skipped
            if pending.future.done() or (is_segment(pending) and not idle):
                continue
            self._cancel_routing_task_for_pending_request(pending)
            self._record_queue_wait_time(pending)
            if is_segment(pending):
                self.on_send_request(replica.replica_id)  # busy from now on; the call's answer corrects the count
            pending.future.set_result(replica)
            self._remove_pending_request_from_indices(pending)
            return
