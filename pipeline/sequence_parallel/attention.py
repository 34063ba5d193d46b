"""Self-attention over a sequence split by frames: Ulysses (all-to-all over heads) and ring (K/V passed around).

Both take each rank's local tokens ``[B, S_local, H, D]`` (all heads) and return the attention output for those
same tokens, equal to single-device attention over the whole window. The parallel padding frames at the end of
the last ranks are kept out of the keys by *truncation*, not by a mask: they always sit at the end of the
sequence, so dropping them is exactly a boolean key mask, and it keeps mask-free kernels (flash) usable.

- **Ulysses**: one all-to-all turns ``[B, S/n, H, D]`` (q, k, v together) into ``[B, S, H/n, D]``; attention runs
  over the whole sequence for ``H/n`` heads; a second all-to-all returns ``[B, S/n, H, D]``. Needs ``n | H``.
- **Ring**: queries stay put; each rank's K/V block travels around the ring (``n - 1`` hops, the next hop in
  flight while the current block is attended). Partial results are merged by their log-sum-exp, in fp32. Any
  degree; more bytes than Ulysses for ``n >= 3`` (see ``pipeline.sequence_parallel.volume``).

Why not diffusers' context-parallel attention (``attention_dispatch._templated_context_parallel_attention``)?
Its ring needs a backend that returns the LSE, and the native (SDPA) backend raises on ``return_lse``, so ring
cannot run on the CPU at all; its "ring" also all-gathers every K/V block at once (memory of the whole sequence on
every rank). Its Ulysses needs a ``DeviceMesh``-backed ``ParallelConfig`` and carries padding as an all-gathered
mask, which rules out flash kernels. Both are ~40 lines here, with the bytes they send counted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttention, _get_qkv_projections
from torch import Tensor

from .comm import SequenceGroup
from .split import AttentionKind, FrameSplit

__all__ = ["SequenceParallelSelfAttnProcessor", "attention_with_lse", "ring_attention", "ulysses_attention"]


def ulysses_attention(query: Tensor, key: Tensor, value: Tensor, valid_tokens: int, comm: SequenceGroup,
                      backend=None) -> Tensor:
    """Ulysses attention. ``query/key/value``: ``[B, S_local, H, D]``; ``valid_tokens``: the length of the
    whole sequence without the parallel padding. Returns ``[B, S_local, H, D]``."""
    batch, local, heads, dim = query.shape
    n = comm.degree
    group_heads = heads // n
    # [B, S_l, H, D] -> [n (head group), 3, B, S_l, H/n, D]: chunk j (head group j) goes to rank j
    qkv = torch.stack([query, key, value]).unflatten(3, (n, group_heads)).permute(3, 0, 1, 2, 4, 5)
    qkv = comm.all_to_all(qkv, "ulysses_qkv")  # row j: rank j's tokens for this rank's head group
    query, key, value = qkv.permute(1, 2, 0, 3, 4, 5).flatten(2, 3).unbind(0)  # [B, S, H/n, D] each
    out = dispatch_attention_fn(query, key[:, :valid_tokens], value[:, :valid_tokens], backend=backend)
    # [B, S, H/n, D] -> [n (token block), B, S_l, H/n, D]: token block j goes back to rank j
    out = comm.all_to_all(out.unflatten(1, (n, local)).transpose(0, 1), "ulysses_out")  # row j: head group j
    return out.permute(1, 2, 0, 3, 4).flatten(2, 3)  # [B, S_l, H, D]


def attention_with_lse(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention and its log-sum-exp: ``[B, H, Sq, D]`` inputs -> ``([B, H, Sq, D], [B, H, Sq] fp32)``.

    Kernels that return the LSE: the CPU flash kernel, and on CUDA the flash kernel (fp16/bf16) or the
    memory-efficient one (fp32).
    """
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value)
    elif query.device.type == "cuda" and query.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value)[:2]
    elif query.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, True)[:2]
    else:
        raise NotImplementedError(f"ring attention has no LSE kernel for {query.device.type}")
    return out, lse[..., : query.shape[2]].float()  # the efficient kernel pads the LSE to a multiple of 32


def ring_attention(query: Tensor, key: Tensor, value: Tensor, valid_tokens: list[int],
                   comm: SequenceGroup) -> Tensor:
    """Ring attention. ``query/key/value``: ``[B, S_local, H, D]``; ``valid_tokens[r]``: how many of rank
    ``r``'s tokens are keys (its parallel padding excluded). Returns ``[B, S_local, H, D]``."""
    query, key, value = (x.transpose(1, 2) for x in (query, key, value))  # [B, H, S_l, D]
    block = torch.stack([key, value])  # the K/V block that travels
    out = lse = None
    for hop in range(comm.degree):
        owner = (comm.rank - hop) % comm.degree
        in_flight = comm.ring_pass(block, "ring_kv") if hop < comm.degree - 1 else None
        keys = valid_tokens[owner]
        if keys:
            part, part_lse = attention_with_lse(query, block[0][:, :, :keys], block[1][:, :, :keys])
            part, part_lse = part.float(), part_lse.unsqueeze(-1)
            if out is None:
                out, lse = part, part_lse
            else:  # merge two softmax-normalised partial results by their log-sum-exp
                out = out - torch.sigmoid(part_lse - lse) * (out - part)
                lse = lse - F.logsigmoid(lse - part_lse)
        if in_flight is not None:
            block = in_flight.wait()
    return out.to(query.dtype).transpose(1, 2)  # set: rank 0's block always has keys


class SequenceParallelSelfAttnProcessor:
    """``WanAttnProcessor``'s self-attention (q/k/v, RMS norms across heads, RoPE on the local tokens), with the
    attention itself split over the unit's ranks. Installed on ``attn1`` of every block of a rank's DiT.

    The per-call geometry comes from the local sequence length alone: it is ``frames_per_rank`` whole frames, so
    tokens per frame, the valid length and each rank's valid share follow from the ``FrameSplit``.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, comm: SequenceGroup, split: FrameSplit, kind: AttentionKind):
        self.comm, self.split, self.kind = comm, split, kind

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        rotary_emb: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            raise ValueError("the sequence-parallel processor serves unmasked self-attention only")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))  # [B, S_local, H, D]
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = apply_rotary_emb(query, *rotary_emb), apply_rotary_emb(key, *rotary_emb)

        tokens_per_frame = self.split.tokens_per_frame(hidden_states.shape[1])
        if self.kind == "ulysses":
            hidden_states = ulysses_attention(query, key, value, self.split.num_slots * tokens_per_frame,
                                              self.comm, self._attention_backend)
        else:
            valid = [self.split.valid_tokens(r, tokens_per_frame) for r in range(self.split.degree)]
            hidden_states = ring_attention(query, key, value, valid, self.comm)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


def apply_rotary_emb(hidden_states: Tensor, freqs_cos: Tensor, freqs_sin: Tensor) -> Tensor:
    """Wan's interleaved RoPE (``WanAttnProcessor``'s inner function, which is not importable)."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)
