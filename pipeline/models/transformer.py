"""StableAvatar's talking DiT as a thin subclass of diffusers' ``WanTransformer3DModel``.

Upstream is ``WanTransformer3DFantasyModel`` (Wan2.1-Fun-V1.1-1.3B-InP plus audio). Everything not listed here is
stock diffusers (norm placement, FP32LayerNorm, q/k RMSNorm, GELU-tanh FFN, RoPE tables, head, unpatchify).
Deviations from stock diffusers, each pinned by ``golden/transformer`` (see golden-feasibility.md §1.3):

- **float64 cos-first timestep sinusoid** (``Float64Timesteps``): upstream builds ``t * freq`` in float64 and casts
  to fp32 afterwards; diffusers' fp32 ``Timesteps`` is 7e-6 off on ``e`` (2e-5 on the output).
- **token zero-padding to ``seq_len``**: a short last window is padded with zero tokens after the patch embedding
  and attended to without a mask, because the per-frame audio view needs exactly ``21 * tokens_per_frame`` tokens.
- **unrotated RoPE on padding tokens** (cos 1, sin 0): upstream only rotates the real ``f*h*w`` tokens; giving the
  padding the RoPE of frames 16-20 moves the last-window output by 0.08.
- **text padded to exactly 512 rows before ``text_embedder``**: the padding rows are ``text_embedder(0)`` and are
  attended to (upstream), and diffusers' processor derives the image-context length as ``len - 512``.
- **audio cross-attention inside ``attn2``** (``StableAvatarAttnProcessor``): per latent frame, the block's
  RMS-normed query attends to ``k_vocal``/``v_vocal`` of that frame's audio slot (no key norm, no mask); the result
  is summed as (text + image) + audio before the shared ``to_out``.
- **block forward overridden** (``StableAvatarTransformerBlock``): the stock block passes no kwargs to ``attn2``,
  so the vocal context could not reach the processor otherwise. The math is otherwise the stock Wan2.1 block.
- **adapter run once, on the last batch row** (``VocalProjector``): fed with that row's padded patch tokens,
  ``e0`` and ``e``. Rows without audio (CFG null audio) get *zeros in adapter-output space*, not the adapter
  applied to silent features; the ``k_vocal``/``v_vocal`` biases still contribute there.

Precision: the golden vectors are fp32 on CPU. For bf16 weights, ``_keep_in_fp32_modules`` keeps the stock fp32
modules plus the adapter's ``modulation`` parameters (honoured by ``from_pretrained(torch_dtype=...)`` and by
``to_inference_dtype``; a plain ``.to(dtype)`` casts everything except the RoPE tables). All LayerNorms compute in
fp32 and modulation sums are formed in fp32 (stock diffusers behaviour; upstream's bf16 autocast modulates in bf16).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanRotaryPosEmbed,
    WanTransformer3DModel,
    WanTransformerBlock,
    _get_added_kv_projections,
    _get_qkv_projections,
)
from diffusers.utils import apply_lora_scale
from torch import Tensor, nn

from .audio_split import AUDIO_EXPAND_LENGTH, latent_slot_count, split_audio_sequence
from .block_residual import BlockResidual
from .devices import compute_device, weights_onloaded
from .vocal_projector import VocalProjector

__all__ = [
    "TEXT_LEN",
    "BlockResidual",
    "Float64Timesteps",
    "StableAvatarAttnProcessor",
    "StableAvatarTransformer3DModel",
    "StableAvatarTransformerBlock",
    "pad_rotary",
]

TEXT_LEN = 512  # text context rows; diffusers' Wan processor hard-codes this split too


def pad_rotary(freqs_cos: Tensor, freqs_sin: Tensor, num_pad: int) -> tuple[Tensor, Tensor]:
    """RoPE tables ``[1, n, 1, D]`` extended by ``num_pad`` unrotated positions (cos 1, sin 0)."""
    return (
        torch.cat([freqs_cos, freqs_cos.new_ones(1, num_pad, 1, freqs_cos.shape[-1])], dim=1),
        torch.cat([freqs_sin, freqs_sin.new_zeros(1, num_pad, 1, freqs_sin.shape[-1])], dim=1),
    )


class PrecisionKeepingRotaryPosEmbed(WanRotaryPosEmbed):
    """``WanRotaryPosEmbed`` whose fp32 cos/sin tables survive ``model.to(dtype)``: only their device follows.

    A plain ``model.to(torch.bfloat16)`` would otherwise round the RoPE tables to bf16 (~3 significant digits).
    """

    def _apply(self, fn, recurse=True):
        tables = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, table in tables.items():
            if not table.is_meta:
                self._buffers[name] = table.to(self._buffers[name].device)
        return self


class Float64Timesteps(nn.Module):
    """Wan's ``sinusoidal_embedding_1d``: ``cat(cos, sin)`` of ``t * 10000^(-i/half)`` formed in float64.

    ``[B]`` timesteps -> ``[B, num_channels]`` float32. Parameter-free, so it leaves the state dict unchanged.
    """

    def __init__(self, num_channels: int):
        super().__init__()
        if num_channels % 2:
            raise ValueError(f"num_channels must be even, got {num_channels}")
        self.num_channels = num_channels

    def forward(self, timesteps: Tensor) -> Tensor:
        half = self.num_channels // 2
        # MPS has no float64; everything else matches upstream's float64 exactly.
        dtype = torch.float32 if timesteps.device.type == "mps" else torch.float64
        position = timesteps.to(dtype)
        freqs = torch.pow(10000, -torch.arange(half, dtype=dtype, device=timesteps.device).div(half))
        sinusoid = torch.outer(position, freqs)  # [B, half]
        return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1).float()


class StableAvatarAttnProcessor:
    """``WanAttnProcessor`` cross-attention math plus StableAvatar's per-latent-frame audio term.

    ``encoder_hidden_states`` is ``[B, 257 + 512, C]`` (image then text context); ``vocal_context`` is
    ``[B, S, K, C]`` (S latent-frame slots of K audio tokens). The query sequence must be ``S * tokens_per_frame``
    long (the model pads it), since query tokens are viewed frame-major as ``[B*S, seq/S, H, D]``.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        rotary_emb: tuple[Tensor, Tensor] | None = None,
        vocal_context: Tensor | None = None,
    ) -> Tensor:
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            image_context_length = encoder_hidden_states.shape[1] - TEXT_LEN
            encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]

        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))  # [B, seq, H, D]
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))  # [B, 512, H, D]
        value = value.unflatten(2, (attn.heads, -1))

        # Text
        hidden_states = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, backend=self._attention_backend, parallel_config=None
        )
        hidden_states = hidden_states.flatten(2, 3).type_as(query)  # [B, seq, C]

        # Image (CLIP tokens)
        if encoder_hidden_states_img is not None:
            key_img, value_img = _get_added_kv_projections(attn, encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))  # [B, 257, H, D]
            value_img = value_img.unflatten(2, (attn.heads, -1))
            hidden_states_img = dispatch_attention_fn(
                query, key_img, value_img, backend=self._attention_backend, parallel_config=None
            )
            hidden_states = hidden_states + hidden_states_img.flatten(2, 3).type_as(query)

        # Audio: each latent frame's tokens attend only to that frame's K audio tokens (no key norm, no mask)
        if vocal_context is not None:
            batch_size, num_slots = vocal_context.shape[:2]
            query_audio = query.unflatten(1, (num_slots, -1)).flatten(0, 1)  # [B*S, seq/S, H, D]
            # [B, S, K, C] -> [B*S, K, H, D]
            key_audio = attn.k_vocal(vocal_context).flatten(0, 1).unflatten(2, (attn.heads, -1))
            value_audio = attn.v_vocal(vocal_context).flatten(0, 1).unflatten(2, (attn.heads, -1))
            hidden_states_audio = dispatch_attention_fn(
                query_audio, key_audio, value_audio, backend=self._attention_backend, parallel_config=None
            )  # [B*S, seq/S, H, D]
            hidden_states_audio = hidden_states_audio.flatten(2, 3).unflatten(0, (batch_size, num_slots))
            hidden_states = hidden_states + hidden_states_audio.flatten(1, 2).type_as(query)  # [B, seq, C]

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


class StableAvatarTransformerBlock(WanTransformerBlock):
    """Wan2.1 block whose cross-attention also reads the vocal context (``attn2.k_vocal``/``attn2.v_vocal``)."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        qk_norm: str = "rms_norm_across_heads",
        cross_attn_norm: bool = False,
        eps: float = 1e-6,
        added_kv_proj_dim: int | None = None,
    ):
        super().__init__(dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps, added_kv_proj_dim)
        inner_dim = self.attn2.inner_dim
        # Zero-initialised upstream: an untrained audio branch leaves the base model's output unchanged.
        self.attn2.k_vocal = nn.Linear(inner_dim, inner_dim)
        self.attn2.v_vocal = nn.Linear(inner_dim, inner_dim)
        for layer in (self.attn2.k_vocal, self.attn2.v_vocal):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.attn2.set_processor(StableAvatarAttnProcessor())

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        temb: Tensor,
        rotary_emb: tuple[Tensor, Tensor],
        vocal_context: Tensor | None = None,
    ) -> Tensor:
        # hidden_states: [B, seq, C]; encoder_hidden_states: [B, 769, C]; temb (e0): [B, 6, C]
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
            self.scale_shift_table + temb.float()
        ).chunk(6, dim=1)

        # 1. Self-attention
        norm_hidden_states = (self.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).type_as(
            hidden_states
        )
        attn_output = self.attn1(norm_hidden_states, None, None, rotary_emb)
        hidden_states = (hidden_states.float() + attn_output * gate_msa).type_as(hidden_states)

        # 2. Cross-attention (text + image + audio)
        norm_hidden_states = self.norm2(hidden_states.float()).type_as(hidden_states)
        attn_output = self.attn2(
            norm_hidden_states, encoder_hidden_states, None, None, vocal_context=vocal_context
        )
        hidden_states = hidden_states + attn_output

        # 3. Feed-forward
        norm_hidden_states = (self.norm3(hidden_states.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(
            hidden_states
        )
        ff_output = self.ffn(norm_hidden_states)
        hidden_states = (hidden_states.float() + ff_output.float() * c_gate_msa).type_as(hidden_states)
        return hidden_states


class StableAvatarTransformer3DModel(WanTransformer3DModel):
    """Wan2.1 I2V DiT with StableAvatar's audio adapter and per-frame audio cross-attention.

    Defaults are the StableAvatar 1.3B (Wan2.1-Fun-V1.1-1.3B-InP) values. The extra arguments: ``audio_in_dim``
    (wav2vec feature width), ``audio_heads`` / ``audio_blocks`` (adapter attention heads / blocks). The adapter
    width equals the DiT inner dim.
    """

    _no_split_modules = ["StableAvatarTransformerBlock", "VocalProjector"]
    _repeated_blocks = ["StableAvatarTransformerBlock"]
    _keep_in_fp32_modules = [*WanTransformer3DModel._keep_in_fp32_modules, "modulation"]
    # diffusers' equal token chunks would break the 21-slot frame alignment of the audio attention; sequence
    # parallelism splits by latent frames instead (pipeline.sequence_parallel).
    _cp_plan = None

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 12,
        attention_head_dim: int = 128,
        in_channels: int = 36,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 8960,
        num_layers: int = 30,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = 1280,
        added_kv_proj_dim: int | None = 1536,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        audio_in_dim: int = 768,
        audio_heads: int = 8,
        audio_blocks: int = 2,
    ) -> None:
        # The parent is built without blocks (ours replace them; no throw-away allocation), then the config's
        # num_layers, which the parent's own register_to_config overwrote, is restored.
        super().__init__(
            patch_size=patch_size,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=text_dim,
            freq_dim=freq_dim,
            ffn_dim=ffn_dim,
            num_layers=0,
            cross_attn_norm=cross_attn_norm,
            qk_norm=qk_norm,
            eps=eps,
            image_dim=image_dim,
            added_kv_proj_dim=added_kv_proj_dim,
            rope_max_seq_len=rope_max_seq_len,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        self.register_to_config(num_layers=num_layers)

        inner_dim = num_attention_heads * attention_head_dim
        self.rope = PrecisionKeepingRotaryPosEmbed(attention_head_dim, patch_size, rope_max_seq_len)
        self.condition_embedder.timesteps_proj = Float64Timesteps(freq_dim)
        self.blocks = nn.ModuleList(
            [
                StableAvatarTransformerBlock(
                    inner_dim, ffn_dim, num_attention_heads, qk_norm, cross_attn_norm, eps, added_kv_proj_dim
                )
                for _ in range(num_layers)
            ]
        )
        self.vocal_projector = VocalProjector(
            audio_in_dim, inner_dim, num_heads=audio_heads, num_blocks=audio_blocks
        )

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        latents: Tensor,
        y: Tensor,
        timestep: Tensor,
        text_context: Sequence[Tensor],
        clip_fea: Tensor,
        audio_features: Tensor | None,
        audio_rows: Sequence[bool],
        seq_len: int,
        audio_num_frames: int = 81,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        block_residual: BlockResidual | None = None,
    ) -> Transformer2DModelOutput | tuple[Tensor]:
        """Velocity prediction for one window, batched over the CFG rows.

        Args:
            latents: ``[B, 16, L, h, w]`` noisy latents of the window (``L <= 21``).
            y: ``[B, 20, L, h, w]`` mask (4) + reference latent (16).
            timestep: ``[B]`` float timesteps (``sigma * 1000``).
            text_context: ``B`` tensors ``[n_i, text_dim]`` (unpadded, ``n_i <= 512``).
            clip_fea: ``[B, 257, image_dim]`` CLIP image tokens.
            audio_features: ``[1, N, audio_in_dim]`` wav2vec features of this window's audio slice, or ``None``.
            audio_rows: per batch row, whether it receives the adapter output; other rows get zeros in
                adapter-output space (CFG null audio). Upstream CFG order: ``[False, True, True]``.
            seq_len: tokens of a full 21-frame window; shorter windows are zero-padded to it.
            audio_num_frames: pixel frames the audio slice is spread over (``split_audio_sequence``).
            return_dict: return a ``Transformer2DModelOutput`` (diffusers' convention) rather than a 1-tuple.
            attention_kwargs: as in diffusers' Wan: only ``scale`` (the LoRA scale, PEFT backend) is read.
            block_residual: the step cache's slot (``pipeline.step_cache``). With ``reuse`` set, the adapter and the
                transformer blocks are skipped and ``reuse`` is added to the blocks' input tokens; otherwise the
                blocks run and ``computed`` receives their output minus their input. ``None``: plain forward.

        Returns:
            ``[B, 16, L, h, w]`` prediction in ``latents.dtype``, as ``.sample`` or as the tuple's only element.
        """
        batch_size = latents.shape[0]
        self._check_batch(batch_size, text_context, audio_rows)
        hidden_states, rotary_emb, num_real = self.embed_window(latents, y, seq_len)
        temb, timestep_proj, text_states, image_states = self.embed_conditions(timestep, text_context, clip_fea)

        if block_residual is not None and block_residual.reuse is not None:
            # 3'-4'. Step cache hit: the blocks' output is their input plus the unit's last residual.
            hidden_states = hidden_states + block_residual.reuse.to(hidden_states.device)
        else:
            encoder_hidden_states = torch.cat([image_states, text_states], dim=1)  # [B, 769, C]
            # 3. Audio adapter on the last row; zeros (adapter-output space) for the null-audio rows
            vocal_context = self._vocal_context(
                hidden_states, temb, timestep_proj, audio_features, audio_rows, audio_num_frames
            )  # [B, S, K, C]
            if seq_len % vocal_context.shape[1]:
                raise ValueError(
                    f"seq_len {seq_len} is not a multiple of {vocal_context.shape[1]} latent-frame slots"
                )
            blocks_input = hidden_states

            # 4. Transformer blocks
            hidden_states = self.run_blocks(
                hidden_states, encoder_hidden_states, timestep_proj, rotary_emb, vocal_context
            )
            if block_residual is not None:
                block_residual.computed = hidden_states - blocks_input  # [B, seq_len, C]

        # 5. Output norm and projection, un-padding and unpatchify
        hidden_states = self.project_out(hidden_states, temb)  # [B, seq_len, p_t*p_h*p_w*16]
        output = self.unpatchify(hidden_states[:, :num_real], latents)  # [B, 16, L, h, w]
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    # The forward's stages, also composed by the sequence-parallel forward (``pipeline.sequence_parallel``).
    @staticmethod
    def _check_batch(batch_size: int, text_context: Sequence[Tensor], audio_rows: Sequence[bool]) -> None:
        if len(text_context) != batch_size or len(audio_rows) != batch_size:
            raise ValueError(
                f"batch {batch_size}: got {len(text_context)} text contexts and {len(audio_rows)} audio_rows flags"
            )

    def embed_window(self, latents: Tensor, y: Tensor, seq_len: int) -> tuple[Tensor, tuple[Tensor, Tensor], int]:
        """Patch tokens zero-padded to ``seq_len`` (``[B, seq_len, C]``), their RoPE tables (``[1, seq_len, 1, D]``
        each; padding unrotated) and the number of real tokens."""
        batch_size = latents.shape[0]
        dtype, device = self.patch_embedding.weight.dtype, self.patch_embedding.weight.device

        # 1. Patch embedding, zero-padded to seq_len: [B, 36, L, h, w] -> [B, seq_len, C]
        hidden_states = torch.cat([latents, y], dim=1).to(device=device, dtype=dtype)
        freqs_cos, freqs_sin = self.rope(hidden_states)  # [1, n_real, 1, D] each (fp32 tables)
        hidden_states = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2)  # [B, n_real, C]
        num_real = hidden_states.shape[1]
        if num_real > seq_len:
            raise ValueError(f"window has {num_real} tokens, more than seq_len={seq_len}")
        num_pad = seq_len - num_real
        hidden_states = torch.cat(
            [hidden_states, hidden_states.new_zeros(batch_size, num_pad, hidden_states.shape[2])], 1
        )
        return hidden_states, pad_rotary(freqs_cos, freqs_sin, num_pad), num_real

    def embed_conditions(
        self, timestep: Tensor, text_context: Sequence[Tensor], clip_fea: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``e`` ``[B, C]``, ``e0`` ``[B, 6, C]``, text states ``[B, 512, C]`` and image states ``[B, 257, C]``."""
        dtype, device = self.patch_embedding.weight.dtype, self.patch_embedding.weight.device
        # 2. Conditions: text zero-padded to 512 rows before the text embedder; context = [image 257 | text 512]
        text = torch.stack([self._pad_text(t) for t in text_context])  # [B, 512, text_dim]
        text = text.to(device=device, dtype=dtype)
        temb, timestep_proj, text_states, image_states = self.condition_embedder(
            timestep.to(device), text, clip_fea.to(device=device, dtype=dtype)
        )  # temb (e): [B, C]; timestep_proj: [B, 6C]; text_states: [B, 512, C]; image_states: [B, 257, C]
        return temb, timestep_proj.unflatten(1, (6, -1)), text_states, image_states

    def run_blocks(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        timestep_proj: Tensor,
        rotary_emb: tuple[Tensor, Tensor],
        vocal_context: Tensor,
    ) -> Tensor:
        """The transformer blocks over ``[B, seq, C]`` tokens."""
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, encoder_hidden_states, timestep_proj, rotary_emb, vocal_context
                )
            else:
                hidden_states = block(hidden_states, encoder_hidden_states, timestep_proj, rotary_emb, vocal_context)
        return hidden_states

    def project_out(self, hidden_states: Tensor, temb: Tensor) -> Tensor:
        """Output norm (modulated by ``e``, not ``e0``) and projection: ``[B, n, C]`` -> ``[B, n, p_t*p_h*p_w*16]``."""
        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)  # [B, 1, C] each
        hidden_states = (self.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        return self.proj_out(hidden_states)

    def unpatchify(self, tokens: Tensor, latents: Tensor) -> Tensor:
        """``[B, n_real, p_t*p_h*p_w*16]`` projected real tokens -> ``[B, 16, L, h, w]`` in ``latents.dtype``."""
        batch_size, _, num_frames, height, width = latents.shape
        p_t, p_h, p_w = self.config.patch_size
        hidden_states = tokens.reshape(batch_size, num_frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
        hidden_states = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3).to(latents.dtype)

    @torch.no_grad()
    def timestep_modulation(self, timesteps: Tensor) -> Tensor:
        """``e0`` (the blocks' timestep modulation, ``[N, 6, C]``) for ``N`` timesteps, computed by the same
        condition embedder as ``forward`` (the step cache's input: for Wan it depends only on the timestep).

        Computed on the device ``forward`` runs on, with the embedder's weights brought there by the offload hook
        when a memory mode keeps them elsewhere (no hook fires outside ``forward``)."""
        with weights_onloaded(self):
            device, dtype = compute_device(self), self.patch_embedding.weight.dtype
            text = torch.zeros(timesteps.shape[0], 1, self.config.text_dim, device=device, dtype=dtype)
            _, timestep_proj, _, _ = self.condition_embedder(timesteps.to(device), text, None)
        return timestep_proj.unflatten(1, (6, -1))

    def to_inference_dtype(self, dtype: torch.dtype) -> StableAvatarTransformer3DModel:
        """Cast in place the way ``from_pretrained(torch_dtype=dtype)`` does: parameters whose dotted path contains
        a ``_keep_in_fp32_modules`` component (scale/shift tables, time embedder, norms, adapter modulations) stay
        float32, the rest become ``dtype``. A plain ``.to(dtype)`` casts everything.
        """
        keep = set(self._keep_in_fp32_modules or [])
        with torch.no_grad():
            for name, param in self.named_parameters():
                target = torch.float32 if keep.intersection(name.split(".")) else dtype
                if param.is_floating_point() and param.dtype != target:
                    param.data = param.data.to(target)
        return self

    @staticmethod
    def _pad_text(context: Tensor) -> Tensor:
        """``[n, text_dim]`` -> ``[512, text_dim]`` with zero rows appended."""
        if context.ndim != 2 or context.shape[0] > TEXT_LEN:
            raise ValueError(f"text context must be [n <= {TEXT_LEN}, text_dim], got {tuple(context.shape)}")
        return F.pad(context, (0, 0, 0, TEXT_LEN - context.shape[0]))

    def _vocal_context(
        self,
        hidden_states: Tensor,
        temb: Tensor,
        timestep_proj: Tensor,
        audio_features: Tensor | None,
        audio_rows: Sequence[bool],
        audio_num_frames: int,
        slots: slice | None = None,
    ) -> Tensor:
        """``[B, S, K, C]``: the adapter output for rows flagged in ``audio_rows``, zeros for the others.

        The adapter runs once, on the last batch row (all CFG rows share latents and timestep). Without audio
        features the context is zeros ``[B, S, 1, C]``: attention over identical zero keys averages identical values,
        so it equals a zero context of any length K. With features but no audio row (the null-audio row run on its
        own), the zeros have the adapter's K, so that row computes exactly what it computes inside the CFG batch.

        ``slots``: only these latent-frame slots (a sequence-parallel rank's frames); ``hidden_states`` then holds
        just those frames' tokens. ``None``: all slots.
        """
        batch_size, _, dim = hidden_states.shape
        num_slots = len(range(latent_slot_count(audio_num_frames))[slots or slice(None)])
        if audio_features is None:
            return hidden_states.new_zeros(batch_size, num_slots, 1, dim)
        if audio_features.shape[0] != 1:
            raise ValueError(f"audio_features must be [1, N, C], got {tuple(audio_features.shape)}")
        if not any(audio_rows) or num_slots == 0:
            ranges = split_audio_sequence(audio_features.shape[1], audio_num_frames)
            slot_len = max(end - start + 1 for start, end in ranges) + 2 * AUDIO_EXPAND_LENGTH
            return hidden_states.new_zeros(batch_size, num_slots, slot_len, dim)

        vocal = self.vocal_projector(
            audio_features.to(device=hidden_states.device, dtype=hidden_states.dtype),
            hidden_states[-1:],  # [1, seq_len, C] padded patch tokens
            timestep_proj[-1:],
            temb[-1:],
            num_frames=audio_num_frames,
            slots=slots,
        ).to(hidden_states.dtype)  # [1, S, K, C]
        null = torch.zeros_like(vocal)
        return torch.cat([vocal if row else null for row in audio_rows], dim=0)  # [B, S, K, C]
