"""One rank's forward of the StableAvatar DiT under sequence parallelism, split by latent frames.

Why an explicit split plan and not diffusers' context-parallel hooks (``_cp_plan`` + ``apply_context_parallel``):
stock Wan's plan splits the output of ``self.rope`` and the input of ``blocks.0`` into equal token chunks and
gathers at ``proj_out``. In this model that would (1) split the RoPE tables *before* the forward pads them to
``seq_len`` (each rank would append padding to its own chunk), (2) cut the sequence mid-frame for any degree that
does not divide 21 and give no way to keep padding out of the keys, and (3) leave every rank viewing its local
tokens as the 21 frame slots of the audio attention: upstream StableAvatar's multi-GPU bug, where audio tokens
meet the wrong frames (``tests/test_sequence_parallel.py`` shows that split differs). Hooks can only split a
module's inputs and outputs; the frame bookkeeping has to live in the forward. So this module composes the
model's own stages (``embed_window``, ``embed_conditions``, ``run_blocks``, ``project_out``, ``unpatchify``) around
a :class:`~pipeline.sequence_parallel.split.FrameSplit`:

1. Rank ``r`` patch-embeds only its frames (the temporal patch is 1, so frames embed independently); frames past
   the window's length are the model's zero padding, frames past 21 the parallel padding. RoPE: the window's
   tables, padded unrotated as the model pads them, sliced to the same frames: split consistently with the tokens.
2. Timestep, text and image conditions are computed on every rank (tiny next to the blocks); cross-attention to
   the text/image context is per token, so it is local.
3. The audio adapter runs for the rank's own slots only: its cross-attention is per frame, each slot reading its
   own frame's tokens. Every DiT block then sees a vocal context of exactly the rank's frames, so the unchanged
   ``StableAvatarAttnProcessor`` pairs frame ``f`` with slot ``f`` (parallel padding frames get zero slots).
4. Self-attention is Ulysses or ring (``SequenceParallelSelfAttnProcessor``, installed on every ``attn1``).
5. The projected tokens (64 values each) are all-gathered and unpatchified on every rank, so every rank returns
   the whole prediction and the guidance step after it needs no further communication.

A step-cache residual (``BlockResidual``) is the rank's shard ``[B, S_local, C]``; each rank keeps its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import Tensor, nn

from pipeline.models.audio_split import latent_slot_count
from pipeline.models.transformer import BlockResidual, StableAvatarTransformer3DModel, pad_rotary

from .attention import SequenceParallelSelfAttnProcessor
from .comm import SequenceGroup
from .split import AttentionKind, FrameSplit, choose_attention

__all__ = ["SequenceParallelTransformer"]


class SequenceParallelTransformer(nn.Module):
    """Rank ``comm.rank``'s share of ``model``'s forward; called with the same arguments on every rank, in
    lock-step, it returns what ``model(...)`` returns, on every rank.

    Installs the sequence-parallel self-attention processor on ``model``'s blocks: from then on the model runs
    only through this wrapper (a rank owns its copy of the DiT).
    """

    def __init__(self, model: StableAvatarTransformer3DModel, comm: SequenceGroup,
                 attention: AttentionKind | Literal["auto"] = "auto"):
        super().__init__()
        if model.config.patch_size[0] != 1:
            raise ValueError(f"frames must embed independently (temporal patch 1), got {model.config.patch_size}")
        self.model = model
        self.comm = comm
        self.split = FrameSplit(comm.degree)
        self.attention = choose_attention(model.config.num_attention_heads, comm.degree, attention,
                                          self.split.num_slots)
        processor = SequenceParallelSelfAttnProcessor(comm, self.split, self.attention)
        if len(model.blocks):  # keep a backend chosen with set_attention_backend before wrapping
            processor._attention_backend = model.blocks[0].attn1.processor._attention_backend
        for block in model.blocks:
            block.attn1.set_processor(processor)

    @torch.no_grad()
    def timestep_modulation(self, timesteps: Tensor) -> Tensor:
        return self.model.timestep_modulation(timesteps)

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
        """``StableAvatarTransformer3DModel.forward``'s contract (see there); ``attention_kwargs`` (LoRA scale) is
        not supported here."""
        if attention_kwargs:
            raise ValueError("attention_kwargs (LoRA scale) are not supported under sequence parallelism")
        model, split = self.model, self.split
        model._check_batch(latents.shape[0], text_context, audio_rows)
        tokens_per_frame = self._tokens_per_frame(latents, seq_len, audio_num_frames)
        frames, slots = split.frames(self.comm.rank), split.slots(self.comm.rank)

        hidden_states, rotary_emb = self._local_tokens(latents, y, frames, tokens_per_frame)  # [B, S_local, C]
        temb, timestep_proj, text_states, image_states = model.embed_conditions(timestep, text_context, clip_fea)
        if block_residual is not None and block_residual.reuse is not None:
            hidden_states = hidden_states + block_residual.reuse.to(hidden_states.device)
        else:
            encoder_hidden_states = torch.cat([image_states, text_states], dim=1)  # [B, 769, C]
            vocal_context = self.local_vocal_context(
                hidden_states, temb, timestep_proj, audio_features, audio_rows, audio_num_frames,
                slots, tokens_per_frame)  # [B, frames_per_rank, K, C]
            blocks_input = hidden_states
            hidden_states = model.run_blocks(
                hidden_states, encoder_hidden_states, timestep_proj, rotary_emb, vocal_context)
            if block_residual is not None:
                block_residual.computed = hidden_states - blocks_input  # [B, S_local, C]

        projected = model.project_out(hidden_states, temb)  # [B, S_local, p_t*p_h*p_w*16]
        gathered = self.comm.all_gather(projected, "output").transpose(0, 1).flatten(1, 2)  # [B, S_padded, ...]
        output = model.unpatchify(gathered[:, : latents.shape[2] * tokens_per_frame], latents)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    def local_vocal_context(self, hidden_states: Tensor, temb: Tensor, timestep_proj: Tensor,
                            audio_features: Tensor | None, audio_rows: Sequence[bool], audio_num_frames: int,
                            slots: range, tokens_per_frame: int) -> Tensor:
        """The vocal context of exactly this rank's frames, ``[B, frames_per_rank, K, C]``: the adapter over the
        rank's slots (fed with their frames' tokens), then zero slots for its parallel padding frames."""
        vocal_context = self.model._vocal_context(
            hidden_states[:, : len(slots) * tokens_per_frame], temb, timestep_proj, audio_features, audio_rows,
            audio_num_frames, slots=slice(slots.start, slots.stop))
        return F.pad(vocal_context, (0, 0, 0, 0, 0, self.split.frames_per_rank - len(slots)))

    def _tokens_per_frame(self, latents: Tensor, seq_len: int, audio_num_frames: int) -> int:
        _, p_h, p_w = self.model.config.patch_size
        num_frames, height, width = latents.shape[2:]
        tokens_per_frame = (height // p_h) * (width // p_w)
        if latent_slot_count(audio_num_frames) != self.split.num_slots:
            raise ValueError(f"the split is planned for {self.split.num_slots} frame slots; audio_num_frames "
                             f"{audio_num_frames} gives {latent_slot_count(audio_num_frames)}")
        if seq_len != self.split.num_slots * tokens_per_frame or num_frames > self.split.num_slots:
            raise ValueError(f"seq_len {seq_len} must be {self.split.num_slots} frames of {tokens_per_frame} "
                             f"tokens, and the window at most {self.split.num_slots} frames (got {num_frames})")
        return tokens_per_frame

    def _local_tokens(self, latents: Tensor, y: Tensor, frames: range,
                      tokens_per_frame: int) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """This rank's frames' patch tokens ``[B, S_local, C]`` (zeros for padding frames) and RoPE tables."""
        model = self.model
        dtype, device = model.patch_embedding.weight.dtype, model.patch_embedding.weight.device
        window = torch.cat([latents, y], dim=1).to(device=device, dtype=dtype)  # [B, 36, L, h, w]
        num_frames = window.shape[2]
        freqs_cos, freqs_sin = model.rope(window)  # [1, L * tokens_per_frame, 1, D] each
        padding = (self.split.padded_frames - num_frames) * tokens_per_frame
        local = slice(frames.start * tokens_per_frame, frames.stop * tokens_per_frame)
        rotary_emb = tuple(table[:, local] for table in pad_rotary(freqs_cos, freqs_sin, padding))

        batch_size, dim = window.shape[0], model.patch_embedding.out_channels
        own = window[:, :, frames.start: min(frames.stop, num_frames)]
        if own.shape[2]:
            tokens = model.patch_embedding(own).flatten(2).transpose(1, 2)  # [B, own frames * tpf, C]
        else:
            tokens = window.new_zeros(batch_size, 0, dim)
        local_tokens = len(frames) * tokens_per_frame
        tokens = torch.cat([tokens, tokens.new_zeros(batch_size, local_tokens - tokens.shape[1], dim)], dim=1)
        return tokens, rotary_emb
