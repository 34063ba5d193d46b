"""Tensors kept in host memory by key, least recently used first out beyond a bound in bytes, with hit, miss and
eviction counters: what the prompt cache and the reference-image cache share.

A value is one tensor or a tuple of tensors, moved to host memory when it is put; an entry larger than the whole
bound is not kept. Callers must not modify a value they get: it is shared by every request with that key. Not
thread-safe: its owner uses it from one thread at a time.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Generic, TypeVar

import torch

V = TypeVar("V", torch.Tensor, tuple[torch.Tensor, ...])


@dataclass
class CacheStats:
    """Counters for the metrics (monotonic, except ``entries`` and ``bytes``: the current content)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def value_bytes(value: torch.Tensor | tuple[torch.Tensor, ...]) -> int:
    return tensor_bytes(value) if isinstance(value, torch.Tensor) else sum(map(tensor_bytes, value))


def to_host(value: V) -> V:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu")
    return tuple(tensor.detach().to("cpu") for tensor in value)


class HostTensorCache(Generic[V]):
    """LRU of ``key -> value`` in host memory, bounded in bytes (``max_bytes`` 0: nothing is kept)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, V] = OrderedDict()
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> V | None:
        """The cached value of ``key`` (counted as a hit), or ``None`` (a miss)."""
        value = self._entries.get(key)
        if value is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return value

    def put(self, key: str, value: V) -> V:
        """Keep a host-memory copy of ``value`` under ``key``, evicting the least recently used entries beyond the
        bound; returns the host copy (what ``get`` will return)."""
        value = to_host(value)
        size = value_bytes(value)
        if key in self._entries:
            self.stats.bytes -= value_bytes(self._entries.pop(key))
        if size > self.max_bytes:
            self._sync_entries()
            return value
        while self.stats.bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.stats.bytes -= value_bytes(evicted)
            self.stats.evictions += 1
        self._entries[key] = value
        self.stats.bytes += size
        self._sync_entries()
        return value

    def clear(self) -> None:
        self._entries.clear()
        self.stats.bytes = 0
        self._sync_entries()

    def _sync_entries(self) -> None:
        self.stats.entries = len(self._entries)
