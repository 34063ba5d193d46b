"""Bytes a parallel unit sends per window-step (one batch-3 forward), computed from the model's sizes.

Per rank, per forward (``S_l`` = local tokens = ``ceil(21 / n)`` frames, ``C`` = inner dim, ``b`` = bytes per value,
``B`` = CFG rows, ``n`` = degree; a chunk a rank keeps for itself is not sent):

- Ulysses, per block: q/k/v all-to-all ``3·B·S_l·C·b·(n-1)/n`` and output all-to-all ``B·S_l·C·b·(n-1)/n``;
- ring, per block: ``n - 1`` hops of the K/V block, ``2·B·S_l·C·b`` each;
- once per forward: the all-gather of the projected tokens, ``B·S_l·P·b·(n-1)`` (``P`` = 64 values per token).

Keys match :class:`~pipeline.sequence_parallel.comm.SequenceGroup`'s counters, so a gloo run checks them exactly.
A unit that reuses a step-cache residual adds one 4-byte agreement and skips the blocks' traffic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .split import AttentionKind, FrameSplit, choose_attention

__all__ = ["StepVolume", "step_volume"]


@dataclass(frozen=True)
class StepVolume:
    degree: int
    attention: AttentionKind
    tokens_per_frame: int
    local_tokens: int  # per rank, parallel padding included
    bytes_per_call: dict[str, int]  # one collective call, bytes one rank sends
    calls: dict[str, int]  # calls per forward
    num_layers: int

    @property
    def sent_per_rank(self) -> dict[str, int]:
        """Bytes one rank sends per forward, by collective."""
        return {op: self.bytes_per_call[op] * self.calls[op] for op in self.calls}

    @property
    def rank_bytes(self) -> int:
        return sum(self.sent_per_rank.values())

    @property
    def unit_bytes(self) -> int:
        """All ranks together, per forward."""
        return self.degree * self.rank_bytes

    @property
    def block_rank_bytes(self) -> int:
        """One rank, one transformer block (the attention traffic)."""
        return sum(v for op, v in self.sent_per_rank.items() if op != "output") // self.num_layers


def step_volume(transformer: dict[str, Any], width: int, height: int, degree: int,
                attention: AttentionKind | Literal["auto"] = "auto", batch: int = 3,
                dtype_bytes: int = 2) -> StepVolume:
    """The traffic of one window-step forward at ``width x height`` pixels (VAE x8) for a transformer config
    (``REAL_TRANSFORMER``, ``TINY_TRANSFORMER``, ...)."""
    heads, head_dim = transformer["num_attention_heads"], transformer["attention_head_dim"]
    kind = choose_attention(heads, degree, attention)
    p_t, p_h, p_w = transformer["patch_size"]
    tokens_per_frame = (height // 8 // p_h) * (width // 8 // p_w)
    split = FrameSplit(degree)
    local = split.frames_per_rank * tokens_per_frame
    activation = batch * local * heads * head_dim * dtype_bytes  # [B, S_l, C]
    layers = transformer["num_layers"]
    projected = batch * local * p_t * p_h * p_w * transformer["out_channels"] * dtype_bytes
    if kind == "ulysses":
        per_call = {"ulysses_qkv": 3 * activation * (degree - 1) // degree,
                    "ulysses_out": activation * (degree - 1) // degree}
        calls = {"ulysses_qkv": layers, "ulysses_out": layers}
    else:
        per_call = {"ring_kv": 2 * activation}
        calls = {"ring_kv": layers * (degree - 1)}
    per_call["output"] = projected * (degree - 1)
    calls["output"] = 1
    return StepVolume(degree, kind, tokens_per_frame, local, per_call, calls, layers)
