"""The reference-image cache: the conditioning a reference image gives every window (``y``: the VAE latents of the
reference clip, and the CLIP tokens), by the resized image's pixels, so an avatar reused across requests costs no
VAE encode of its 81-frame reference clip and no CLIP forward.

Both tensors depend only on the pixels at the chosen size (and the replica's fixed models): the key is a hash of
the ``[H, W, 3]`` uint8 image the encoders see, so the same picture sent at another aspect ratio is another entry.
An entry is ``y`` ``[1, 20, 21, H/8, W/8]`` and the tokens ``[1, 257, d]`` in host memory (about 8 MiB at 512x512
in fp32), least recently used first out beyond ``max_bytes`` (:class:`~pipeline.host_cache.HostTensorCache`).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from pipeline.host_cache import HostTensorCache


def reference_key(image_u8: np.ndarray) -> str:
    """The cache key of a resized reference image: its shape and a SHA-256 of its pixels."""
    pixels = np.ascontiguousarray(image_u8)
    return f"{'x'.join(map(str, pixels.shape))}:{hashlib.sha256(pixels.data).hexdigest()}"


class ReferenceConditioningCache(HostTensorCache[tuple[torch.Tensor, ...]]):
    """LRU of ``reference_key(image) -> (y, clip_context)`` bounded in bytes, with hit/miss counters."""
