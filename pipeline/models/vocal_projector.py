"""StableAvatar's time-step-aware audio adapter (upstream ``FantasyTalkingVocalCondition1BModel``).

Submodule names equal the checkpoint's (``vocal_projector.`` prefix stripped), so its keys load unchanged:
``proj_model.{proj,norm}``, ``blocks.N.{norm3, cross_attn.{q,k,v,o,norm_q,norm_k}, ffn.{0,2}, modulation}``,
``final_head.{final_proj, modulation}``.

Data flow for one window (real 1.3B sizes in brackets: C = 1536, audio_in_dim = 768, K = 15, seq_len = 21 * 1560):

1. ``proj_model``: wav2vec features ``[1, N, audio_in_dim]`` -> Linear (no bias) -> LayerNorm (eps 1e-5) ``[1, N, C]``.
2. ``split_audio_sequence`` / ``split_tensor_with_padding``: ``[1, 21, K, C]``, flattened to ``[1, 21*K, C]``.
3. Two blocks, each modulated by the DiT's ``e0`` (``m = block.modulation + e0``, 6 chunks):
   ``x += (LN(x)(1+m1)+m0)*m2`` (a modulation-only step, no attention), ``x += CrossAttn(norm3(x), latents)``
   computed per latent frame (queries ``[21, K]``, keys/values ``[21, seq_len/21]`` of the DiT's padded patch
   tokens, 8 heads, RMS-normed q/k), ``x += FFN(LN(x)(1+m4)+m3)*m5`` with a GELU-tanh FFN of width 2C.
4. ``final_head``: ``final_proj(LN(x)(1+m1)+m0)`` with ``m = modulation + e``; reshaped to ``[1, 21, K, C]``.

The golden vectors discriminate these details at ~1e-4 on the DiT output: 8 heads, eps 1e-6 for the non-affine
LayerNorms and the q/k RMSNorms, GELU-tanh (not exact GELU) in the FFN. All LayerNorm math runs in fp32
(``FP32LayerNorm``) and the modulation sums are formed in fp32, whatever the weight dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.normalization import FP32LayerNorm
from torch import Tensor, nn

from .audio_split import split_audio_sequence, split_tensor_with_padding

__all__ = ["VocalProjector"]


class VocalProjModel(nn.Module):
    """wav2vec features ``[B, N, audio_in_dim]`` -> ``[B, N, dim]``: Linear without bias, affine LayerNorm eps 1e-5."""

    def __init__(self, audio_in_dim: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.proj = nn.Linear(audio_in_dim, dim, bias=False)
        self.norm = FP32LayerNorm(dim, eps=eps, elementwise_affine=True)

    def forward(self, audio_features: Tensor) -> Tensor:
        return self.norm(self.proj(audio_features))


class VocalCrossAttention(nn.Module):
    """Audio-slot queries attend to the DiT tokens of their own latent frame (no RoPE, no mask)."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        # RMSNorm over the full dim (across heads), as in the DiT's attention.
        self.norm_q = nn.RMSNorm(dim, eps=eps, elementwise_affine=True)
        self.norm_k = nn.RMSNorm(dim, eps=eps, elementwise_affine=True)

    def forward(self, x: Tensor, latents: Tensor, num_slots: int) -> Tensor:
        # x: [B, S*K, C] audio slots; latents: [B, seq_len, C] padded patch tokens; S = num_slots
        batch = x.shape[0]
        q = self.norm_q(self.q(x))
        k = self.norm_k(self.k(latents))
        v = self.v(latents)

        # [B, S*K, C] -> [B*S, H, K, D] and [B, seq_len, C] -> [B*S, H, seq_len/S, D]
        q = q.unflatten(1, (num_slots, -1)).flatten(0, 1).unflatten(2, (self.num_heads, -1)).transpose(1, 2)
        k = k.unflatten(1, (num_slots, -1)).flatten(0, 1).unflatten(2, (self.num_heads, -1)).transpose(1, 2)
        v = v.unflatten(1, (num_slots, -1)).flatten(0, 1).unflatten(2, (self.num_heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(q, k, v)  # [B*S, H, K, D]
        out = out.transpose(1, 2).flatten(2, 3).unflatten(0, (batch, num_slots)).flatten(1, 2)  # [B, S*K, C]
        return self.o(out)


class VocalAttentionBlock(nn.Module):
    """Modulation-only step, per-frame cross-attention to the video tokens, modulated FFN."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = VocalCrossAttention(dim, num_heads, eps)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: Tensor, latents: Tensor, e0: Tensor, num_slots: int) -> Tensor:
        # x: [B, S*K, C]; latents: [B, seq_len, C]; e0: [B, 6, C]
        shift, scale, gate, c_shift, c_scale, c_gate = (self.modulation.float() + e0.float()).chunk(6, dim=1)

        # 1. Modulation-only step (upstream keeps the block layout of a self-attention block, minus the attention)
        x = (x.float() + (self.norm1(x.float()) * (1 + scale) + shift) * gate).type_as(x)

        # 2. Per-latent-frame cross-attention to the DiT's patch tokens
        x = x + self.cross_attn(self.norm3(x.float()).type_as(x), latents, num_slots)

        # 3. Feed-forward
        ffn_in = (self.norm2(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        x = (x.float() + self.ffn(ffn_in).float() * c_gate).type_as(x)
        return x


class VocalFinalHead(nn.Module):
    """``final_proj(LN(x) * (1 + m1) + m0)`` with ``m = modulation + e`` (the DiT's time embedding, not ``e0``)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.final_proj = nn.Linear(dim, dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        # x: [B, S*K, C]; e: [B, C]
        shift, scale = (self.modulation.float() + e.float()[:, None]).chunk(2, dim=1)
        return self.final_proj((self.norm(x.float()) * (1 + scale) + shift).type_as(x))


class VocalProjector(nn.Module):
    """The time-step-aware audio adapter; its output is the ``vocal_context`` read by every DiT block's ``attn2``.

    Args:
        audio_in_dim: wav2vec feature width (768 for wav2vec2-base).
        dim: adapter width; must equal the DiT inner dim (it adds the DiT's ``e0``/``e`` and feeds ``k_vocal``).
        num_heads: heads of the adapter cross-attention (8 upstream, head dim 192 for the 1.3B model).
        num_blocks: adapter blocks (2 upstream).
        eps: eps of the non-affine LayerNorms, of ``norm3`` and of the q/k RMSNorms (``proj_model`` uses 1e-5).
    """

    def __init__(
        self, audio_in_dim: int, dim: int, num_heads: int = 8, num_blocks: int = 2, eps: float = 1e-6
    ):
        super().__init__()
        self.proj_model = VocalProjModel(audio_in_dim, dim)
        self.blocks = nn.ModuleList([VocalAttentionBlock(dim, num_heads, eps) for _ in range(num_blocks)])
        self.final_head = VocalFinalHead(dim, eps)

    def forward(
        self,
        audio_features: Tensor,
        latents: Tensor,
        e0: Tensor,
        e: Tensor,
        num_frames: int = 81,
        slots: slice | None = None,
    ) -> Tensor:
        """Compute the vocal context of one window.

        Args:
            audio_features: ``[B, N, audio_in_dim]`` wav2vec features of the window's audio slice.
            latents: ``[B, seq_len, C]`` DiT patch tokens zero-padded to ``seq_len`` (taken before any DiT block).
            e0: ``[B, 6, C]`` the DiT's timestep projection; ``e``: ``[B, C]`` its time embedding.
            num_frames: pixel frames the audio is spread over (81: 21 latent-frame slots).
            slots: compute only these latent-frame slots (``latents`` then holds only their frames' tokens): each
                slot attends to its own frame only, so a subset of slots computes what the whole does for them.

        Returns:
            ``[B, S, K, C]`` vocal context (``S`` = 21 latent-frame slots, ``K`` tokens per slot).
        """
        feature = self.proj_model(audio_features)  # [B, N, C]
        ranges = split_audio_sequence(feature.shape[1], num_frames)
        slot_tokens, _ = split_tensor_with_padding(feature, ranges)  # [B, S, K, C]
        if slots is not None:
            slot_tokens = slot_tokens[:, slots]
        num_slots, slot_len = slot_tokens.shape[1], slot_tokens.shape[2]
        if latents.shape[1] % num_slots:
            raise ValueError(
                f"seq_len {latents.shape[1]} is not a multiple of the {num_slots} latent-frame slots"
            )

        x = slot_tokens.flatten(1, 2)  # [B, S*K, C]
        for block in self.blocks:
            x = block(x, latents, e0, num_slots)
        x = self.final_head(x, e)
        return x.unflatten(1, (num_slots, slot_len))  # [B, S, K, C]
