"""How a window's tokens are split over the ranks of a parallel unit: on latent-frame boundaries only.

The per-frame audio attention pairs latent frame ``f``'s tokens with audio slot ``f``, so a rank must hold whole
frames and know which ones. A window has ``num_slots`` (21) frame slots; ``degree`` ranks get
``ceil(num_slots / degree)`` consecutive frames each. When ``degree`` does not divide 21 the grid is extended by
*parallel padding* frames at the end (degree 2: 22 frames, rank 1 holds frames 11-20 and one padding frame). These
frames exist only so that every rank holds the same number of tokens (collectives need equal shapes); they are
kept out of every key set, get no audio, and are dropped from the output.

Parallel padding is different from the model's own padding of a short last window (frames ``L..20`` of zero
tokens): those are attended to without a mask, as upstream does, so they are ordinary frames here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pipeline.models.audio_split import latent_slot_count

__all__ = ["AttentionKind", "FrameSplit", "choose_attention", "ulysses_degrees"]

AttentionKind = Literal["ulysses", "ring"]
WINDOW_SLOTS = latent_slot_count(81)  # 21 latent-frame slots per window


def ulysses_degrees(num_heads: int) -> list[int]:
    """Degrees Ulysses attention can use: those dividing the head count (12 heads: 2, 3, 4, 6, 12)."""
    return [d for d in range(2, num_heads + 1) if num_heads % d == 0]


def choose_attention(num_heads: int, degree: int, requested: AttentionKind | Literal["auto"] = "auto",
                     num_slots: int = WINDOW_SLOTS) -> AttentionKind:
    """The self-attention scheme for ``degree`` ranks: Ulysses where the heads divide evenly (one all-to-all each
    way, full-length attention per head group), ring attention otherwise (any degree up to one frame per rank)."""
    if not 2 <= degree <= num_slots:
        raise ValueError(f"sp_degree must be between 2 and {num_slots} (one latent frame per rank), got {degree}")
    if requested == "auto":
        return "ulysses" if num_heads % degree == 0 else "ring"
    if requested == "ulysses" and num_heads % degree:
        raise ValueError(
            f"Ulysses attention splits the {num_heads} heads evenly: sp_degree must be one of "
            f"{ulysses_degrees(num_heads)}, got {degree} (ring attention takes any degree up to {num_slots})")
    if requested not in ("ulysses", "ring"):
        raise ValueError(f"unknown attention {requested!r}; choose auto, ulysses or ring")
    return requested


@dataclass(frozen=True)
class FrameSplit:
    """``degree`` ranks over ``num_slots`` latent frames of ``tokens_per_frame`` tokens each (frame-major)."""

    degree: int
    num_slots: int = WINDOW_SLOTS

    def __post_init__(self) -> None:
        if not 1 <= self.degree <= self.num_slots:
            raise ValueError(f"degree must be between 1 and {self.num_slots}, got {self.degree}")

    @property
    def frames_per_rank(self) -> int:
        return math.ceil(self.num_slots / self.degree)

    @property
    def padded_frames(self) -> int:
        """Frames including the parallel padding: a multiple of ``degree``."""
        return self.frames_per_rank * self.degree

    def frames(self, rank: int) -> range:
        """The frame indices rank ``rank`` holds, parallel padding included (indices >= ``num_slots``)."""
        if not 0 <= rank < self.degree:
            raise ValueError(f"rank {rank} out of range for degree {self.degree}")
        start = rank * self.frames_per_rank
        return range(start, start + self.frames_per_rank)

    def slots(self, rank: int) -> range:
        """The audio slots (real frames) of rank ``rank``: its frames without the parallel padding."""
        frames = self.frames(rank)
        return range(frames.start, min(frames.stop, self.num_slots))

    def valid_tokens(self, rank: int, tokens_per_frame: int) -> int:
        """Tokens of rank ``rank`` that other tokens may attend to (the parallel padding is excluded)."""
        return len(self.slots(rank)) * tokens_per_frame

    def tokens_per_frame(self, local_tokens: int) -> int:
        """Tokens per frame from a rank's local sequence length."""
        if local_tokens % self.frames_per_rank:
            raise ValueError(f"{local_tokens} local tokens are not {self.frames_per_rank} whole frames")
        return local_tokens // self.frames_per_rank
