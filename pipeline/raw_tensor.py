"""Tensors that pickle as raw bytes, so pickle protocol 5 (Ray's) moves them without copies.

torch pickles a tensor through ``torch.save`` into an in-memory buffer: the sender makes two transient copies before
the bytes reach their destination (Ray's object store), the receiver two more (the pickled bytes, then the tensor),
and a view pickles its whole storage. A numpy ``uint8`` view of a compact tensor is instead a pickle-5 out-of-band
buffer: written once into the object store and read there in place by a receiver on the same node.
"""

from __future__ import annotations

import warnings

import torch


def compact(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when it owns exactly its storage, else a contiguous copy of just its elements."""
    if tensor.is_contiguous() and tensor.storage_offset() == 0 and (
            tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()):
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


class RawTensor:
    """A CPU tensor as dtype + shape + a numpy ``uint8`` view of its bytes (no copy for a compact CPU tensor)."""

    def __init__(self, tensor: torch.Tensor):
        flat = compact(tensor.detach().cpu()).reshape(-1)
        self.dtype = str(tensor.dtype).removeprefix("torch.")
        self.shape = tuple(tensor.shape)
        self.data = flat.view(torch.uint8).numpy()

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def tensor(self) -> torch.Tensor:
        """The tensor, sharing this object's memory: read-only when that memory is the object store's, so the
        receiver must only read it (slices, copies and arithmetic are fine; in-place ops are not)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch warns that the numpy array is not writable
            raw = torch.from_numpy(self.data)
        return raw.view(getattr(torch, self.dtype)).reshape(self.shape)
