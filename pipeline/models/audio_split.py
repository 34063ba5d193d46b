"""Assignment of wav2vec tokens to the 21 latent-frame slots of one window (StableAvatar's audio split).

Index-exact reproduction of upstream ``split_audio_sequence`` / ``split_tensor_with_padding``
(``wan/models/vocal_projector_fantasy.py``), pinned by ``golden/audio_split/cases.json``:

- ``tpf = N / num_frames`` wav2vec tokens per video frame and ``half = int(tpf * 4 / 2)``;
- latent frame ``i >= 1`` is centred on token ``int(tpf * (4i - 1)) - 1`` and covers ``[c - half, c + half]``;
- latent frame 0 is special-cased: ``[r1_start - 2 * half, r1_start]`` (it ends where frame 1 starts);
- every range is widened by ``expand_length`` tokens on both sides and sliced *inclusively*; positions outside
  ``[0, N)`` become zero rows **appended after** the valid tokens (front padding included), unmasked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["AUDIO_EXPAND_LENGTH", "latent_slot_count", "split_audio_sequence", "split_tensor_with_padding"]

AUDIO_EXPAND_LENGTH = 4  # tokens added on each side of every slot's range


def latent_slot_count(num_frames: int = 81) -> int:
    """Latent frames of a ``num_frames`` pixel clip with the Wan VAE's 4x causal temporal compression (81 -> 21)."""
    return (num_frames - 1) // 4 + 1


def split_audio_sequence(n_tokens: int, num_frames: int = 81) -> list[tuple[int, int]]:
    """Inclusive ``(start, end)`` token ranges, one per latent frame, before the ``expand_length`` widening.

    Ranges may start below 0 or end past ``n_tokens - 1``; ``split_tensor_with_padding`` turns those positions
    into zero padding.
    """
    if n_tokens <= 0:
        raise ValueError(f"need at least one audio token, got {n_tokens}")
    tokens_per_frame = n_tokens / num_frames
    half = int(tokens_per_frame * 4 / 2)
    num_slots = latent_slot_count(num_frames)

    ranges: list[tuple[int, int]] = []
    for i in range(1, num_slots):
        centre = int(tokens_per_frame * (4 * i - 1)) - 1
        ranges.append((centre - half, centre + half))
    first_end = ranges[0][0] if ranges else half
    return [(first_end - 2 * half, first_end), *ranges]


def split_tensor_with_padding(
    x: Tensor, ranges: Sequence[tuple[int, int]], expand_length: int = AUDIO_EXPAND_LENGTH
) -> tuple[Tensor, Tensor]:
    """Gather each widened range of ``x`` into a fixed-length slot.

    Args:
        x: ``[B, N, C]`` token sequence (wav2vec features after the adapter's input projection).
        ranges: inclusive ranges from ``split_audio_sequence``.
        expand_length: tokens added on each side of every range.

    Returns:
        ``[B, S, K, C]`` slots (``S = len(ranges)``, ``K`` = longest widened range) with the in-range tokens first
        and zero rows after them, and ``k_lens [S]`` (int64) = number of in-range tokens per slot. ``k_lens`` is
        informational: upstream attends to the padding without a mask.
    """
    batch, n_tokens, channels = x.shape
    widened = [(start - expand_length, end + expand_length) for start, end in ranges]
    slot_len = max(end - start + 1 for start, end in widened)

    # Index n_tokens points at an appended zero row: [S, K]
    index = torch.full((len(widened), slot_len), n_tokens, dtype=torch.long)
    k_lens = torch.empty(len(widened), dtype=torch.long)
    for slot, (start, end) in enumerate(widened):
        valid = torch.arange(max(start, 0), min(end, n_tokens - 1) + 1)
        index[slot, : valid.numel()] = valid
        k_lens[slot] = valid.numel()

    x_padded = torch.cat([x, x.new_zeros(batch, 1, channels)], dim=1)  # [B, N + 1, C]
    slots = x_padded[:, index.to(x.device).flatten()]  # [B, S * K, C]
    return slots.unflatten(1, (len(widened), slot_len)), k_lens
