"""The collectives of a parallel unit, with the bytes each rank sends counted; and the rendezvous of its ranks.

One process group per parallel unit (one per Denoiser replica): NCCL between GPUs, gloo on the CPU. Rank 0 opens
a ``TCPStore`` on a port the OS picks (no race between choosing and binding a port), publishes its address, and
every rank, rank 0 included, joins through it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Rendezvous", "RingPass", "SequenceGroup", "backend_for", "join_group", "open_rendezvous"]

DEFAULT_TIMEOUT_S = 600.0  # a rank that stops answering fails its peers' collectives after this long


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of one parallel unit meet: rank 0's ``TCPStore``."""

    host: str
    port: int

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"


def open_rendezvous(host: str = "127.0.0.1") -> tuple[dist.TCPStore, Rendezvous]:
    """Rank 0's side: a store on a free port of ``host`` (keep the store object alive while the group lives)."""
    store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
    return store, Rendezvous(host, store.port)


def backend_for(device: torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def join_group(rendezvous: Rendezvous, rank: int, degree: int, device: torch.device | str,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> dist.ProcessGroup:
    """Join the unit's process group (blocks until all ``degree`` ranks have joined); returns it.

    The group is this process's default group: a rank process serves exactly one parallel unit.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # collectives and barriers use the current device
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(rendezvous.host, rendezvous.port, is_master=False, timeout=timeout)
    dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=degree, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    return dist.group.WORLD


class RingPass:
    """An in-flight ring exchange: ``wait()`` gives the tensor received from the previous rank."""

    def __init__(self, works: list, received: Tensor):
        self._works, self._received = works, received

    def wait(self) -> Tensor:
        for work in self._works:
            work.wait()
        return self._received


class SequenceGroup:
    """The collectives sequence parallelism uses, over one process group, counting the bytes this rank sends
    per purpose (``sent[op]``; a chunk a rank keeps for itself is not counted)."""

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu"):
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.degree = dist.get_world_size(self.group)
        self.device = torch.device(device)
        self.sent: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def _count(self, op: str, nbytes: int) -> None:
        self.sent[op] += nbytes
        self.calls[op] += 1

    def all_to_all(self, chunks: Tensor, op: str) -> Tensor:
        """``chunks[j]`` goes to rank ``j``; returns ``[degree, ...]`` with row ``j`` received from rank ``j``."""
        if chunks.shape[0] != self.degree:
            raise ValueError(f"all_to_all needs {self.degree} chunks on dim 0, got {tuple(chunks.shape)}")
        chunks = chunks.contiguous()
        received = torch.empty_like(chunks)
        dist.all_to_all_single(received, chunks, group=self.group)
        self._count(op, chunks.numel() * chunks.element_size() * (self.degree - 1) // self.degree)
        return received

    def all_gather(self, tensor: Tensor, op: str) -> Tensor:
        """``[degree, *tensor.shape]``: every rank's ``tensor``, in rank order."""
        tensor = tensor.contiguous()
        gathered = tensor.new_empty((self.degree * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_single(gathered, tensor, group=self.group)
        self._count(op, tensor.numel() * tensor.element_size() * (self.degree - 1))
        return gathered.unflatten(0, (self.degree, tensor.shape[0]))

    def ring_pass(self, tensor: Tensor, op: str) -> RingPass:
        """Send ``tensor`` to the next rank and receive the previous rank's, asynchronously."""
        tensor = tensor.contiguous()
        received = torch.empty_like(tensor)
        following, preceding = (self.rank + 1) % self.degree, (self.rank - 1) % self.degree
        works = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, tensor, group=self.group, group_peer=following),
            dist.P2POp(dist.irecv, received, group=self.group, group_peer=preceding),
        ])
        self._count(op, tensor.numel() * tensor.element_size())
        return RingPass(works, received)

    def all_true(self, flag: bool, op: str) -> bool:
        """Whether ``flag`` holds on every rank (ranks that must take the same branch agree first)."""
        value = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.group)
        self._count(op, value.element_size())
        return bool(value.item())
