"""What each rank runs in the sequence-parallel equality checks (``tests/test_sequence_parallel.py``,
``bench/bench_sp.py``): the same units on ``degree`` ranks and, on rank 0, on one device for reference.

Module-level functions, so spawned rank processes can import them by name. The DiT is the tiny architecture with
every weight perturbed from a fixed seed: the tiny preset zero-initialises ``k_vocal``/``v_vocal`` (as upstream),
which would leave the audio attention inert and the frame alignment untested.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from pipeline.denoise import RequestConditioning, ResidualMissingError, WindowDenoiser, WindowStep
from pipeline.models.transformer import StableAvatarTransformer3DModel
from pipeline.presets import TINY_TRANSFORMER
from pipeline.sequence_parallel import SequenceParallelRank, SequenceParallelTransformer
from pipeline.step_cache import CacheDirective

# Tiny sizes with the real model's 12 heads (head dim 8): every Ulysses degree of the real model exists here.
TINY_12_HEADS: dict[str, Any] = dict(TINY_TRANSFORMER, num_attention_heads=12, attention_head_dim=8,
                                     added_kv_proj_dim=96)
CONFIGS: dict[str, dict[str, Any]] = {"tiny": TINY_TRANSFORMER, "tiny-12-heads": TINY_12_HEADS}
WIDTH, HEIGHT = 48, 80  # the tiny 9:16 size: latent 10 x 6, 15 tokens per frame, seq_len 315
SHORT_WINDOW = 13  # a last window shorter than 21 frames: the model's own token padding
REQUEST = "sp"


def live_model(config: str, seed: int = 7) -> StableAvatarTransformer3DModel:
    """The tiny DiT with every weight moved off its init (audio attention included), identical on every rank."""
    torch.manual_seed(seed)
    model = StableAvatarTransformer3DModel(**CONFIGS[config]).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def conditioning(config: dict[str, Any] = TINY_TRANSFORMER, width: int = WIDTH, height: int = HEIGHT,
                 seed: int = 11) -> RequestConditioning:
    """A request's conditioning for ``config``'s widths at ``width x height`` pixels: random, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    latent_h, latent_w = height // 8, width // 8
    return RequestConditioning(
        request_id=REQUEST,
        text_positive=torch.randn(7, config["text_dim"], generator=g),
        text_negative=torch.randn(5, config["text_dim"], generator=g),
        clip_context=torch.randn(1, 257, config["image_dim"], generator=g),
        y=torch.randn(1, 20, 21, latent_h, latent_w, generator=g),
        audio_features=[torch.randn(1, 161, config["audio_in_dim"], generator=g),
                        torch.randn(1, 101, config["audio_in_dim"], generator=g)],
        seq_len=21 * (latent_h // 2) * (latent_w // 2), num_steps=4, text_scale=5.0, audio_scale=4.0)


def window_latents(width: int = WIDTH, height: int = HEIGHT,
                   seed: int = 13) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A full window's latents, the same window one step later, and a short last window's."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(1, 16, 21, height // 8, width // 8, generator=g)
    later = full + 0.1 * torch.randn(full.shape, generator=g)
    short = torch.randn(1, 16, SHORT_WINDOW, height // 8, width // 8, generator=g)
    return full, later, short


def run_units(rank: SequenceParallelRank, cond: RequestConditioning,
              cold_ranks: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """Every kind of unit, in one fixed order (the same on every rank). Returns rank 0's outputs and every rank's
    step-cache counters.

    ``cold_ranks``: ranks that drop their residuals before the step-cache rebuild and before the last reuse, as
    after an eviction on one rank only: all ranks must then rebuild together, or all raise without anchor latents.
    """
    full, later, short = window_latents()
    outputs: dict[str, torch.Tensor | None] = {}
    outputs["dit"] = forward(rank.denoiser, cond, WindowStep(0, 1, full))
    outputs["unit"] = rank.run(cond, WindowStep(0, 1, full))
    outputs["unit_short"] = rank.run(cond, WindowStep(1, 1, short))
    outputs["unit_row1"] = rank.run(cond, WindowStep(0, 1, full, rows=(1,)))
    outputs["cache_compute"] = rank.run(cond, WindowStep(0, 1, full, cache=CacheDirective(keep=True)))
    outputs["cache_reuse"] = rank.run(cond, WindowStep(0, 2, later, cache=CacheDirective(reuse_from=1)))
    if rank.rank in cold_ranks:
        rank.free(REQUEST)
    outputs["cache_rebuild"] = rank.run(
        cond, WindowStep(0, 2, later, cache=CacheDirective(reuse_from=1, anchor_latents=full)))
    outputs["stats"] = torch.tensor([rank.step_cache.stats.reused, rank.step_cache.stats.rebuilt])
    if rank.rank in cold_ranks:
        rank.free(REQUEST)
    try:  # a reuse without anchor latents where one rank lacks the residual: every rank raises, none hangs
        rank.run(cond, WindowStep(0, 2, later, cache=CacheDirective(reuse_from=1)))
        outputs["missing_raised"] = torch.tensor(False)
    except ResidualMissingError:
        outputs["missing_raised"] = torch.tensor(True)
    per_rank = ("stats", "missing_raised")
    return {k: v for k, v in outputs.items() if v is not None and (rank.rank == 0 or k in per_rank)}


def forward(denoiser: WindowDenoiser, cond: RequestConditioning, work: WindowStep) -> torch.Tensor:
    """The DiT's own output for a unit's batch-3 inputs."""
    with torch.no_grad():
        inputs = denoiser.model_inputs(cond, work.window, work.step, work.latents, work.rows)
        return denoiser.transformer(**inputs, return_dict=False)[0]


class UpstreamSplitTransformer(SequenceParallelTransformer):
    """Upstream StableAvatar's multi-GPU audio attention: each rank views its *local* tokens as the 21 frame
    slots and attends to the whole window's vocal context (the adapter run over the whole window)."""

    def local_vocal_context(self, hidden_states, temb, timestep_proj, audio_features, audio_rows,
                            audio_num_frames, slots, tokens_per_frame):
        whole = self.comm.all_gather(hidden_states, "test").transpose(0, 1).flatten(1, 2)
        return self.model._vocal_context(whole[:, : self.split.num_slots * tokens_per_frame], temb, timestep_proj,
                                         audio_features, audio_rows, audio_num_frames)


def equality_ranks(group: dist.ProcessGroup, device: torch.device, config: str, attention: str,
                   upstream_split: bool = False) -> dict[str, Any]:
    """One rank's part: the units under sequence parallelism, the bytes sent by one batch-3 unit, and on rank 0
    the same units on one device (``reference``). ``upstream_split``: also the DiT output with upstream's split."""
    torch.set_num_threads(1)
    rank = SequenceParallelRank(live_model(config), group, device, attention=attention)
    result: dict[str, Any] = {"attention": rank.denoiser.transformer.attention}
    comm = rank.comm
    cond, (full, _, _) = conditioning(CONFIGS[config]), window_latents()
    comm.sent.clear()
    rank.run(cond, WindowStep(0, 1, full))
    result["sent"] = dict(comm.sent)
    result["parallel"] = run_units(rank, cond, cold_ranks=(comm.degree - 1,))
    if upstream_split:
        upstream = UpstreamSplitTransformer(live_model(config), comm, attention)
        result["upstream_split_dit"] = forward(WindowDenoiser(upstream), cond, WindowStep(0, 1, full))
    if comm.rank == 0:
        result["reference"] = run_units(SequenceParallelRank(live_model(config)), cond)
    return result
