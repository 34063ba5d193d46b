"""Latent checkpoints in storage, written and read through a temporary file, never a latent-sized bytes buffer.

A checkpoint is the whole fused latent (1.4 GiB fp32 for 600 s at 480x832). ``torch.save`` into ``io.BytesIO``
and ``getvalue()`` would hold two more copies of it in the Orchestrator's memory (and ``torch.load`` from
``get_bytes`` two on resume); a file in ``TMPDIR`` costs disk instead, for as long as the transfer takes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from deployments.storage import Storage

CONTENT_TYPE = "application/octet-stream"


def save_checkpoint(storage: Storage, key: str, latents: torch.Tensor, **fields: Any) -> int:
    """Store ``{**fields, "latents": latents}`` under ``key``; returns the stored size."""
    with tempfile.TemporaryDirectory(prefix="stable-avatar-checkpoint-") as tmp:
        path = Path(tmp) / "latents.pt"
        torch.save({**fields, "latents": latents}, path)
        return storage.put_file(key, path, CONTENT_TYPE)


def load_checkpoint(storage: Storage, key: str) -> dict[str, Any]:
    """The stored dict, its tensors read from the file into their own memory. ``StorageNotFoundError`` (a
    ``KeyError``) when the object is gone."""
    with tempfile.TemporaryDirectory(prefix="stable-avatar-checkpoint-") as tmp:
        path = Path(tmp) / "latents.pt"
        storage.get_file(key, path)
        return torch.load(path, weights_only=True)
