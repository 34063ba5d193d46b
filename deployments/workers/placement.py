"""Balanced, sticky placement of units on Denoiser replicas that survives scale events, through Ray Serve's request
router API.

Every Denoiser method takes ``(request_id, key, ...)`` as its first two positional arguments. A unit's key is a
:class:`~deployments.contracts.UnitKey` (unit ``index`` of the ``units`` of its step); :class:`StickyBalancedRouter`
places it by **rendezvous hashing with a load cap** (:func:`place_units`): every (request, unit, replica) has a
weight, a hash of the three; each replica takes at most ``cap = ceil(c·U/N)`` units of a step of U units on N
live replicas (``c`` = :data:`LOAD_FACTOR`), and the units are matched to the replicas by deferred acceptance: a
unit asks the replicas in order of its weights, and a replica over its cap keeps the units that weigh most on it.
The outcome is the units' best stable matching, a function of (request, U, the live replica ids) alone, so:

* **balanced**: no replica runs more than ``ceil(U/N)`` units of a step (with ``c = 1``: the step's shortest
  possible time); ``offset(request)`` plays no part any more, the weights spread concurrent jobs;
* **sticky**: unit ``i`` is the same (window, guidance rows) at every step, so it goes to the same replica from step
  to step while the replica set is stable; that replica keeps the request's conditioning and the unit's step-cache
  residual;
* **stable under scale events**: a replica that joins takes only units that weigh most on it (and those they
  displace), a replica that leaves gives up its own units (and those they displace); about 1/N of a step's units
  move, where ``slot mod N`` moved nearly all (``tests/test_placement.py`` checks the bound; the benchmark counts
  the cache warm-ups moved, ``bench/bench_fanout.py``). A unit that moved finds a cold cache and rebuilds what it
  needs from its anchor latents: it costs time, never bits.

An ``int`` key (``free``, ``stats``, ``step_cache_plan``; :func:`~deployments.contracts.rank_slot`) names a replica
by rank: ``sorted(live replicas)[slot mod N]``, so ``max_replicas`` consecutive slots reach every replica.

Why it cannot busy-loop (see ``ray/serve/_private/request_router/request_router.py``): the base router asks
``choose_replicas`` again at once, without sleeping, unless ``pending_request.routing_context.should_backoff`` is
set; a failed queue-length probe (0.1 s deadline, easily missed on a loaded CPU) then re-asks in a tight loop. This
router always sets it, so every further attempt waits the configured exponential back-off (up to
``max_backoff_s``). And the Denoiser accepts up to ``max_ongoing_requests`` (64) units per replica, far more than
run at once, so a replica practically never rejects a unit: units wait inside the replica on its GPU queue
(:mod:`deployments.workers.unit_queue`, shortest remaining work first), the queue length comes back with every
accepted call and stays cached, and no probe is sent on the hot path. A replica that is full anyway (more than 64
units of concurrent jobs) is retried after the back-off, never replaced by another replica: stickiness holds.

Which pending call gets a chosen replica: Serve's default matches the routing task's call by its internal request
id, but every call made while a replica serves one request (all the units of one Orchestrator job) shares that id,
so only the first of them would ever be matched and the rest would be re-routed forever. Serve's ``FIFOMixin``
hands the replica to the oldest pending call instead, whichever replica that call is placed on, which breaks
stickiness. So the router gives a chosen replica to the oldest pending call *placed on it* (it overrides the same
hook ``FIFOMixin`` does, ``_fulfill_next_pending_request``; Ray is pinned, and ``tests/test_placement.py`` routes
real calls through it). Calls that do not carry ``(str, key)`` leading arguments (a readiness probe) may go to any
replica, the least loaded first.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import TypeVar

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from deployments.contracts import UnitKey

T = TypeVar("T")
LOAD_FACTOR = 1.0  # c: a replica takes at most ceil(c·U/N) units of a step; 1 keeps a step's time the shortest
PLACEMENTS_KEPT = 1024  # (request, step size, replica set) placements a router remembers (LRU)


def routing_key(args: Sequence[object]) -> UnitKey | int | None:
    """The placement key of a Denoiser call from its positional arguments ``(request_id, key, ...)``, or ``None``."""
    if len(args) < 2 or not isinstance(args[0], str):
        return None
    key = args[1]
    if isinstance(key, UnitKey) or (isinstance(key, int) and not isinstance(key, bool)):
        return key
    return None


def place(slot: int, replicas: Sequence[T], key=lambda r: r) -> T:
    """``sorted(replicas, key)[slot mod N]``: the replica of rank ``slot`` among the live ones."""
    if not replicas:
        raise ValueError("no replica to place on")
    ordered = sorted(replicas, key=key)
    return ordered[slot % len(ordered)]


def weight(request_id: str, index: int, replica: str) -> int:
    """The rendezvous weight of unit ``index`` of ``request_id`` on ``replica``: the same in every process."""
    digest = hashlib.blake2b(f"{request_id}\0{index}\0{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def unit_cap(units: int, replicas: int, load_factor: float = LOAD_FACTOR) -> int:
    """Units of one step a replica may take: ``ceil(c·U/N)`` (never below what fits all U units on N replicas)."""
    return max(math.ceil(units / replicas), math.ceil(load_factor * units / replicas - 1e-9))


def place_units(request_id: str, units: int, replicas: Sequence[str],
                load_factor: float = LOAD_FACTOR) -> tuple[str, ...]:
    """The replica of each of the ``units`` units of a step of ``request_id``: rendezvous hashing with a load cap,
    matched by deferred acceptance (the units' best stable matching: unique, whatever order the units ask in)."""
    if not replicas:
        raise ValueError("no replica to place on")
    if units < 1:
        raise ValueError(f"a step has at least one unit, got {units}")
    live = sorted(set(replicas))
    cap = unit_cap(units, len(live), load_factor)
    preferences = []  # per unit: (weight, replica), heaviest first
    for unit in range(units):
        preferences.append(sorted(((weight(request_id, unit, r), r) for r in live), reverse=True))
    asked = [0] * units  # how far down its preferences each unit has gone
    held: dict[str, list[tuple[int, int]]] = {r: [] for r in live}  # per replica: a min-heap of (weight, unit)
    free = list(range(units - 1, -1, -1))
    while free:
        unit = free.pop()
        w, replica = preferences[unit][asked[unit]]
        asked[unit] += 1
        heapq.heappush(held[replica], (w, unit))
        if len(held[replica]) > cap:  # the replica keeps the units that weigh most on it
            free.append(heapq.heappop(held[replica])[1])
    placement = [""] * units
    for replica, kept in held.items():
        for _w, unit in kept:
            placement[unit] = replica
    return tuple(placement)


def moved_units(before: Sequence[str], after: Sequence[str]) -> int:
    """Units of a step whose replica differs between two placements (each a move is a cache warm-up)."""
    return sum(a != b for a, b in zip(before, after, strict=True))


def replica_key(replica: RunningReplica) -> str:
    return replica.replica_id.unique_id


class StickyBalancedRouter(RequestRouter):
    """``choose_replicas``: the replica of the call's key (one rank, one replica); back-off between attempts.
    A chosen replica goes to the oldest pending call placed on it."""

    def _placement(self, request_id: str, units: int, replica_ids: tuple[str, ...]) -> tuple[str, ...]:
        """:func:`place_units`, remembered for the last ``PLACEMENTS_KEPT`` (request, step size, replica set)."""
        cache: OrderedDict | None = getattr(self, "_placements", None)  # Serve builds routers without our __init__
        if cache is None:
            cache = self._placements = OrderedDict()
        key = (request_id, units, replica_ids)
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        placement = cache[key] = place_units(request_id, units, replica_ids)
        while len(cache) > PLACEMENTS_KEPT:
            cache.popitem(last=False)
        return placement

    def placed_on(self, args: Sequence[object], replicas: Sequence[RunningReplica]) -> str | None:
        """The replica id a call with these arguments goes to among ``replicas``; ``None``: any replica."""
        key = routing_key(args)
        if key is None or not replicas:
            return None
        ids = tuple(sorted(replica_key(r) for r in replicas))
        if isinstance(key, UnitKey):
            placed = self._placement(str(args[0]), key.units, ids)[key.index]
            return ids[(ids.index(placed) + key.detour) % len(ids)]
        return ids[key % len(ids)]

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is None:
            return [candidate_replicas]
        pending_request.routing_context.should_backoff = True  # never re-ask without sleeping
        chosen = self.placed_on(pending_request.args, candidate_replicas)
        if chosen is None:
            return [candidate_replicas]  # no placement asked for: the least loaded of all
        return [[r for r in candidate_replicas if replica_key(r) == chosen]]

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        for pending in self._pending_requests_to_fulfill:  # oldest first; finished ones are skipped
            if pending.future.done():
                continue
            chosen = self.placed_on(pending.args, self._replicas_list)
            if chosen is not None and chosen != replica_key(replica):
                continue
            self._cancel_routing_task_for_pending_request(pending)
            self._record_queue_wait_time(pending)
            pending.future.set_result(replica)
            self._remove_pending_request_from_indices(pending)
            return
