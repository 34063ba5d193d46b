"""A Denoiser replica that owns ``denoiser.sp_degree`` GPUs: its rank actors, its process group, and units run on
all its ranks in lock-step (sequence parallelism, ``pipeline.sequence_parallel``; ``docs/many-gpus.md``).

The replica is rank 0 and lives in bundle 0 of its own placement group (``placement_group_bundles``, one bundle per
rank, ``STRICT_PACK``: one node). It starts ranks 1..n-1 as plain Ray actors in bundles 1..n-1 of that group, each
loading the same DiT; rank 0 opens the rendezvous on a port the OS picks on its node's IP, and every rank joins one
process group (gloo on the CPU, NCCL on GPUs), rank 0 in a thread while the actors join in theirs. The router
still sees one target per replica.

Per unit, rank 0 sends the unit's (list-wrapped) object references to every actor and runs its own share in a
thread; the actors run units in the order they were sent (one call at a time), which is the replica's queue
order. Only rank 0's output is returned.

Failures: a process group cannot be re-formed once a rank is gone, so a dead rank ends the replica. ``check_health``
pings the actors (a concurrency group of their own, so a running unit does not delay the answer) and raises if one
does not answer: Serve replaces the replica, and its rank actors, owned by it, go with it. A rank that dies while
a unit runs ends the replica at once (rank 0 exits, as if its own GPU had failed), so the executor re-runs the
unit on another replica instead of sending more units to a group that can only fail them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deployments.config import AppArgs
from deployments.workers.fault_hooks import claim_hook
from deployments.workers.models import load_replica_models
from pipeline.denoise import RequestConditioning, WindowStep
from pipeline.sequence_parallel import SequenceParallelRank, join_group, open_rendezvous
from pipeline.sequence_parallel.comm import DEFAULT_TIMEOUT_S, Rendezvous

logger = logging.getLogger("ray.serve")

PING_TIMEOUT_S = 10.0  # a rank that does not answer a health check within this long counts as dead
# Test hook (never set in production): a JSON file naming one unit {"step": s, "window": w}; the first rank actor
# that receives it claims the file and exits, mid-unit, while its peers wait on it in a collective.
RANK_CRASH_FILE_ENV = "STABLE_AVATAR_TEST_RANK_CRASH_FILE"


@dataclass(frozen=True)
class RankInfo:
    """Where one rank runs (health answers; tests check the placement)."""

    rank: int
    pid: int
    node_id: str
    placement_group_id: str | None
    gpu_ids: tuple[str, ...]


def rank_info(rank: int) -> RankInfo:
    context = ray.get_runtime_context()
    return RankInfo(rank, os.getpid(), context.get_node_id(), context.get_placement_group_id(),
                    tuple(str(gpu) for gpu in ray.get_gpu_ids()))


@ray.remote(concurrency_groups={"health": 1})
class SequenceParallelRankActor:
    """Rank ``rank`` (1..n-1) of a replica's parallel unit. Units and frees run in the default group, one at a
    time, in the order rank 0 sent them; pings in their own group."""

    def __init__(self, args: AppArgs, rank: int, degree: int):
        bundle = load_replica_models(args, args.denoiser, ["transformer"])
        self.placement = bundle.placement  # the DiT stays placed, as on rank 0
        self.transformer = bundle.transformer
        self.args, self.rank_index, self.degree = args, rank, degree
        self.device = args.torch_device(args.denoiser.num_gpus)
        self.rank: SequenceParallelRank | None = None
        self.cache: OrderedDict[str, RequestConditioning] = OrderedDict()
        crash_file = os.environ.get(RANK_CRASH_FILE_ENV)
        self._crash_file = Path(crash_file) if crash_file else None

    def join(self, rendezvous: Rendezvous) -> RankInfo:
        """Join the replica's process group (blocks until every rank has joined)."""
        group = join_group(rendezvous, self.rank_index, self.degree, self.device)
        self.rank = SequenceParallelRank(self.transformer, group, self.device,
                                         step_cache=self.args.pipeline.step_cache)
        return rank_info(self.rank_index)

    def run(self, request_id: str, conditioning: list[ray.ObjectRef], unit: list[ray.ObjectRef]) -> None:
        """This rank's share of one unit (rank 0 returns the output)."""
        work: WindowStep = ray.get(unit[0])
        if self._crash_file is not None and claim_hook(self._crash_file, work):
            os._exit(1)
        self.rank.run(self._conditioning(request_id, conditioning[0]), work)

    def free(self, request_id: str) -> int:
        self.cache.pop(request_id, None)
        return self.rank.free(request_id)

    @ray.method(concurrency_group="health")
    def ping(self) -> RankInfo:
        return rank_info(self.rank_index)

    def _conditioning(self, request_id: str, ref: ray.ObjectRef) -> RequestConditioning:
        if request_id not in self.cache:
            self.cache[request_id] = ray.get(ref)
        self.cache.move_to_end(request_id)
        while len(self.cache) > self.args.conditioning_cache_size:
            self.cache.popitem(last=False)
        return self.cache[request_id]


class RankGroup:
    """Rank 0's side: starts the actors in the replica's placement group, joins the process group with them, and
    runs units on every rank. ``rank`` is rank 0's :class:`SequenceParallelRank` (its denoiser and step cache)."""

    def __init__(self, args: AppArgs, transformer: torch.nn.Module, device: str):
        degree = args.denoiser.sp_degree
        placement_group = ray.util.get_current_placement_group()
        if placement_group is None:
            raise RuntimeError(f"denoiser.sp_degree {degree} needs the replica in a placement group of {degree} "
                               "bundles (DeploymentOptions.serve_options gives one)")
        self._store, rendezvous = open_rendezvous(ray.util.get_node_ip_address())  # kept alive with the group
        resources = args.denoiser.rank_resources()
        self.actors = [
            SequenceParallelRankActor.options(
                num_cpus=resources.get("CPU", 0), num_gpus=resources.get("GPU", 0),
                memory=resources.get("memory"),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=placement_group, placement_group_bundle_index=rank),
            ).remote(args, rank, degree)
            for rank in range(1, degree)
        ]
        joined: dict = {}

        def join_rank_0() -> None:
            try:
                joined["group"] = join_group(rendezvous, 0, degree, device)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the constructor
                joined["error"] = exc

        thread = threading.Thread(target=join_rank_0, name="sp-rank-0-join", daemon=True)
        thread.start()  # init_process_group blocks until every rank has joined
        self.peers: list[RankInfo] = ray.get([actor.join.remote(rendezvous) for actor in self.actors],
                                             timeout=DEFAULT_TIMEOUT_S)
        thread.join(DEFAULT_TIMEOUT_S)
        if "group" not in joined:
            raise RuntimeError(f"rank 0 could not join the replica's process group: {joined.get('error')!r}")
        self.rank = SequenceParallelRank(transformer, joined["group"], device, step_cache=args.pipeline.step_cache)
        self.broken: str | None = None

    def ranks(self) -> list[RankInfo]:
        """Every rank's placement, rank 0 first."""
        return [rank_info(0), *self.peers]

    async def lockstep(self, own, request_id: str, conditioning: list[ray.ObjectRef],
                       unit: list[ray.ObjectRef]):
        """Run a unit on every rank: the actors get its references, rank 0 awaits ``own`` (its forward in a thread);
        returns rank 0's result."""
        if self.broken:
            raise RuntimeError(f"this replica's parallel unit is broken: {self.broken}")
        rank_0 = asyncio.ensure_future(own)
        peers = [asyncio.ensure_future(_awaited(actor.run.remote(request_id, conditioning, unit)))
                 for actor in self.actors]
        # A dead rank may show first as rank 0's collective failing (gloo sees the closed socket) or as its actor's
        # error (NCCL may wait in the collective): either way the replica ends once the actor's death is known.
        await asyncio.wait([rank_0, *peers], return_when=asyncio.FIRST_EXCEPTION)
        self._end_if_a_rank_died(peers)
        await asyncio.wait([rank_0, *peers])  # the ranks fail together (their collectives), or finish together
        self._end_if_a_rank_died(peers)
        failed = [(rank, task.exception()) for rank, task in enumerate(peers, 1) if task.exception() is not None]
        if rank_0.exception() is None and failed:
            self.broken = f"rank {failed[0][0]} failed where rank 0 did not: {failed[0][1]!r}"
            raise RuntimeError(self.broken)
        return rank_0.result()  # rank 0's own error when it failed (the peers raised the same)

    def free(self, request_id: str) -> None:
        """Drop a request's residual shards on the actors (not awaited: each runs it between units, in order)."""
        for actor in self.actors:
            actor.free.remote(request_id)

    async def check(self) -> None:
        """Raise unless every rank actor answers a ping within ``PING_TIMEOUT_S``."""
        if self.broken:
            raise RuntimeError(f"this replica's parallel unit is broken: {self.broken}")
        for rank, actor in enumerate(self.actors, 1):
            try:
                async with asyncio.timeout(PING_TIMEOUT_S):
                    await actor.ping.remote()
            except (RayActorError, TimeoutError) as exc:
                raise RuntimeError(f"rank {rank} of this replica's parallel unit does not answer "
                                   f"({type(exc).__name__}): the replica must be replaced") from exc

    @staticmethod
    def _end_if_a_rank_died(peers: list[asyncio.Future]) -> None:
        for rank, task in enumerate(peers, 1):
            if task.done() and isinstance(task.exception(), RayActorError):
                logger.error("rank %d died during a unit (%s); the process group cannot be re-formed, so this "
                             "replica exits and Serve replaces it", rank, task.exception())
                os._exit(1)


async def _awaited(ref: ray.ObjectRef):
    return await ref
