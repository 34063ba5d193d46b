"""The final latent, from the Orchestrator to the Postprocessor through the object store, without copies.

It is the largest object of a job (1.4 GiB fp32 for 600 s at 480x832): put once as a :class:`RawTensor` (one copy
into the store, none on the heap), read in place by the Postprocessor.
"""

from __future__ import annotations

import ray
import torch

from pipeline.raw_tensor import RawTensor


def put_tensor(tensor: torch.Tensor) -> list[ray.ObjectRef]:
    """Put ``tensor`` into the object store once; the caller may drop its own copy afterwards. The reference is
    wrapped in a list so a handle call passes it on unresolved (see :func:`take_tensor`)."""
    return [ray.put(RawTensor(tensor))]


async def take_tensor(refs: list[ray.ObjectRef]) -> torch.Tensor:
    """The tensor behind :func:`put_tensor`'s reference, read in place from the object store (read-only)."""
    payload: RawTensor = await refs[0]
    return payload.tensor()
