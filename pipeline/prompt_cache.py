"""The prompt-embedding cache: T5 outputs by prompt text, so a prompt reused across requests costs no T5 forward.

One per text encoder (the in-process pipeline's, a Preprocessor replica's). Entries are the encoder's output moved
to host memory (``[n_tokens, 4096]``, at most 4 MiB in bf16 for 512 tokens), least recently used first out beyond
``max_bytes`` (:class:`~pipeline.host_cache.HostTensorCache`).
"""

from __future__ import annotations

import torch

from pipeline.host_cache import HostTensorCache


class PromptEmbeddingCache(HostTensorCache[torch.Tensor]):
    """LRU of ``prompt text -> embedding`` bounded in bytes, with hit/miss counters."""
