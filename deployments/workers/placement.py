"""Balanced, sticky placement of units on Denoiser replicas that survives scale events, through Ray Serve's request
router API.

Every Denoiser method takes ``(request_id, key, ...)`` as its first two positional arguments. A unit's key is a
:class:`~deployments.contracts.UnitKey` (unit ``index`` of the ``units`` of its step); :class:`StickyBalancedRouter`
places it by **rendezvous hashing with a load cap** (:func:`place_units`): every (request, unit, replica) has a
weight, a hash of the three; each replica takes at most ``cap = ceil(c·U/N)`` units of a step of U units on N
live replicas (``c`` = :data:`LOAD_FACTOR`), and the units are matched to the replicas by deferred acceptance: a
unit asks the replicas in order of their load, least first, and of its weights among equally loaded ones, and a
replica over its cap keeps the units that weigh most on it. The outcome is the units' best stable matching, a
function of (request, U, the live replica ids, their loads) alone.

The load is what the router's *other* jobs hold there (:class:`JobPlacements`): per replica, their units per step
whose job the replica's queue serves first (at most as much work left: :mod:`deployments.workers.unit_queue`),
then all their units. The router decides a job's placement once, at its first step, and keeps it; so:

* **balanced**: no replica runs more than ``ceil(U/N)`` units of a step of one job (with ``c = 1``: the step's
  shortest possible time), whatever the load;
* **spread**: concurrent jobs fill the replicas the others leave free before they share one: two short jobs beside
  a long one on 4 replicas never meet on a replica (the weights alone would put them together 5 times in 6, each
  then waiting for the other's unit at every step); a short job that must share goes beside longer jobs' units,
  which its queue serves after it. With equal loads (a lone job) the order is the weights': plain rendezvous hashing;
* **sticky**: unit ``i`` is the same (window, guidance rows) at every step, so it goes to the same replica from step
  to step while the replica set is stable, whatever other jobs start or end meanwhile; that replica keeps the
  request's conditioning and the unit's step-cache residual;
* **stable under scale events**: a job is placed again only when the live replica set changes, with the loads it
  was first placed under (a new replica ranks with the least loaded), so a replica that joins takes units that
  weigh most on it (and those they displace) and one that leaves gives up its own (and those they displace): about
  1/N of a step's units move, where ``slot mod N`` moved nearly all. For a lone job that is rendezvous hashing's
  1.2-2.0x the ideal share; beside other jobs the loads narrow the units' choices, and a cap change displaces more:
  1.2-2.5x (``tests/test_placement.py`` checks both bounds; the benchmark counts the cache warm-ups moved,
  ``bench/bench_fanout.py``). A unit that moved finds a cold cache and rebuilds what it needs from its anchor
  latents: it costs time, never bits.

The table is bounded: the :data:`PLACEMENTS_KEPT` most recently routed jobs; a job stops counting as load once it
routes a unit of its last step (``UnitKey.continues`` false) or after :data:`ACTIVE_S` without a unit (cancelled).
Each Orchestrator replica's handle has its own router and table: a router spreads the jobs *it* runs; jobs of two
Orchestrator replicas see nothing of each other and meet at the load-blind rate. The queue lengths that Serve's
router caches from accepted calls cover every router's units, but only those in flight at that instant (a short
job's units are there for a moment per step), so they are not used to decide a placement kept for the whole job;
the replica's queue still serves the shorter job first when they meet.

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
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from deployments.contracts import UnitKey

T = TypeVar("T")
Load = int | tuple[int, ...]  # a replica's load as placement compares it: less goes first
LOAD_FACTOR = 1.0  # c: a replica takes at most ceil(c·U/N) units of a step; 1 keeps a step's time the shortest
PLACEMENTS_KEPT = 1024  # jobs whose placement a router remembers (LRU)
# A job that routed no unit for this long no longer counts as load (it was cancelled or failed: no last step came).
# Longer than a step of a long job, which routes its units only at the step's start; too long only skews placement.
ACTIVE_S = 600.0


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


def place_units(request_id: str, units: int, replicas: Sequence[str], load_factor: float = LOAD_FACTOR,
                load: Mapping[str, Load] | None = None) -> tuple[str, ...]:
    """The replica of each of the ``units`` units of a step of ``request_id``: rendezvous hashing with a load cap,
    matched by deferred acceptance (the units' best stable matching: unique, whatever order the units ask in).

    ``load``: other jobs' load per replica (comparable values, one for every replica; none: all equal). A unit
    asks the replicas in order of that load, least first, and by its weights among equally loaded ones, so the
    job fills the least loaded replicas up to the cap before it shares a busier one. Equal loads leave the order to
    the weights alone: the plain rule."""
    if not replicas:
        raise ValueError("no replica to place on")
    if units < 1:
        raise ValueError(f"a step has at least one unit, got {units}")
    live = sorted(set(replicas))
    cap = unit_cap(units, len(live), load_factor)
    preferences = []  # per unit: (weight, replica), the least loaded replicas first, then the heaviest weight
    for unit in range(units):
        weighted = ((weight(request_id, unit, r), r) for r in live)
        preferences.append(sorted(weighted, key=lambda wr: (load[wr[1]] if load else 0, -wr[0])))
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


@dataclass
class JobPlacement:
    """One job's placement as a router decided it: for steps of ``units`` units on ``replicas``, under ``load``
    (:meth:`JobPlacements.load` when it was decided; a replica that joined later ranks with the least loaded)."""

    units: int
    replicas: tuple[str, ...]
    load: dict[str, Load]
    placement: tuple[str, ...]
    routed_at: float
    remaining: int  # the job's remaining work (``UnitKey.remaining``) at its last routed unit
    continues: bool  # the job's last routed unit said another step follows


class JobPlacements:
    """A router's placements of its jobs, each decided once, at the job's first step, with the other active jobs'
    units counted as load (:func:`place_units`), and kept for every later step: concurrent jobs spread over the
    replicas and each stays where its caches are. Decided again only when the step's unit count or the live
    replica set changes, and then with the loads it was first decided under, so other jobs coming and going
    since move nothing and a scale event moves about 1/N of the units.

    Bounded: the ``kept`` most recently routed jobs (LRU). A job is *active*, its units load for a new job, until
    it routes a unit of its last step (``UnitKey.continues`` false) or routes none for ``active_s`` (a cancelled
    or failed job sends no last step); a finished job's placement stays for its last units and their retries.
    ``clock`` is for tests."""

    def __init__(self, kept: int = PLACEMENTS_KEPT, active_s: float = ACTIVE_S,
                 clock: Callable[[], float] = time.monotonic):
        self.kept, self.active_s, self.clock = kept, active_s, clock
        self._jobs: OrderedDict[str, JobPlacement] = OrderedDict()

    def __len__(self) -> int:
        return len(self._jobs)

    def load(self, replicas: Sequence[str], excluding: str = "", remaining: int | None = None
             ) -> dict[str, tuple[int, int]]:
        """Per replica, the active jobs' (but ``excluding``'s) units per step there: ``(ahead, all)``, where
        ``ahead`` counts the units of jobs with at most ``remaining`` work left (``None``: all jobs). The replica's
        queue serves those first (:mod:`deployments.workers.unit_queue`), so they are what delays a job with
        ``remaining`` left; a longer job's units wait behind it and only break ties."""
        now = self.clock()
        ahead, total = dict.fromkeys(replicas, 0), dict.fromkeys(replicas, 0)
        for request_id, job in self._jobs.items():
            if request_id == excluding or not job.continues or now - job.routed_at > self.active_s:
                continue
            first = remaining is None or job.remaining <= remaining
            for replica in job.placement:
                if replica in total:
                    total[replica] += 1
                    ahead[replica] += first
        return {replica: (ahead[replica], total[replica]) for replica in replicas}

    def place(self, request_id: str, key: UnitKey, replicas: tuple[str, ...]) -> tuple[str, ...]:
        """The placement of ``request_id``'s step of ``key.units`` units on ``replicas`` (sorted ids)."""
        job = self._jobs.get(request_id)
        if job is None or job.units != key.units:  # a new job (or a step of another size): the loads now
            job = JobPlacement(key.units, (), self.load(replicas, request_id, key.remaining), (), 0.0, 0, True)
        elif job.replicas != replicas:  # a scale event: the loads it was decided under; a new replica ranks
            # with the least loaded of them (its own load now would send the job there first: more units moved)
            least = min((job.load[r] for r in replicas if r in job.load), default=(0, 0))
            job.load.update({r: least for r in replicas if r not in job.load})
        if job.replicas != replicas:
            job.placement = place_units(request_id, key.units, replicas, load=job.load)
            job.replicas = replicas
        job.routed_at, job.remaining, job.continues = self.clock(), key.remaining, key.continues
        self._jobs[request_id] = job
        self._jobs.move_to_end(request_id)
        while len(self._jobs) > self.kept:
            self._jobs.popitem(last=False)
        return job.placement


def replica_key(replica: RunningReplica) -> str:
    return replica.replica_id.unique_id


class StickyBalancedRouter(RequestRouter):
    """``choose_replicas``: the replica of the call's key (one rank, one replica); back-off between attempts.
    A chosen replica goes to the oldest pending call placed on it."""

    def _table(self) -> JobPlacements:
        table: JobPlacements | None = getattr(self, "_job_placements", None)  # Serve builds routers without our __init__
        if table is None:
            table = self._job_placements = JobPlacements()
        return table

    def placed_on(self, args: Sequence[object], replicas: Sequence[RunningReplica]) -> str | None:
        """The replica id a call with these arguments goes to among ``replicas``; ``None``: any replica."""
        key = routing_key(args)
        if key is None or not replicas:
            return None
        ids = tuple(sorted(replica_key(r) for r in replicas))
        if isinstance(key, UnitKey):
            placed = self._table().place(str(args[0]), key, ids)[key.index]
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
