"""The prompt-embedding cache: T5 outputs by prompt text, so a prompt reused across requests costs no T5 forward.

One per text encoder (the in-process pipeline's, a Preprocessor replica's). Entries are the encoder's output moved
to host memory (``[n_tokens, 4096]``, at most 4 MiB in bf16 for 512 tokens), least recently used first out beyond
``max_bytes``; an entry larger than the whole bound is not kept. Not thread-safe: its owner encodes one prompt at a
time.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch


@dataclass
class PromptCacheStats:
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


class PromptEmbeddingCache:
    """LRU of ``prompt text -> embedding`` bounded in bytes, with hit/miss counters."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.stats = PromptCacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._entries

    def get(self, prompt: str) -> torch.Tensor | None:
        """The cached embedding of ``prompt`` (counted as a hit), or ``None`` (a miss). Callers must not modify
        the tensor: it is shared by every request with this prompt."""
        embedding = self._entries.get(prompt)
        if embedding is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(prompt)
        self.stats.hits += 1
        return embedding

    def put(self, prompt: str, embedding: torch.Tensor) -> torch.Tensor:
        """Keep a host-memory copy of ``embedding`` under ``prompt``, evicting the least recently used entries
        beyond the bound; returns the host tensor (what ``get`` will return)."""
        embedding = embedding.detach().to("cpu")
        size = tensor_bytes(embedding)
        if prompt in self._entries:
            self.stats.bytes -= tensor_bytes(self._entries.pop(prompt))
        if size > self.max_bytes:
            self._sync_entries()
            return embedding
        while self.stats.bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.stats.bytes -= tensor_bytes(evicted)
            self.stats.evictions += 1
        self._entries[prompt] = embedding
        self.stats.bytes += size
        self._sync_entries()
        return embedding

    def clear(self) -> None:
        self._entries.clear()
        self.stats.bytes = 0
        self._sync_entries()

    def _sync_entries(self) -> None:
        self.stats.entries = len(self._entries)
