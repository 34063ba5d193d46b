"""The Wan2.1 causal video VAE (diffusers ``AutoencoderKLWan``): encode, and streaming decode.

Latent normalisation lives outside the diffusers VAE (the StableAvatar wrapper has it inside), so it is done here,
in the exact float forms upstream uses: ``(mu - mean) * (1/std)`` on encode and ``z / (1/std) + mean`` on decode.
Both reproduce the golden vectors bit for bit; ``(mu - mean) / std`` does not.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    CACHE_T,
    WanCausalConv3d,
    WanDecoder3d,
    unpatchify,
)

from pipeline.presets import ModelPreset
from pipeline.segment_plan import DecoderReach

from .devices import compute_device

# Smallest width at which post_quant_conv is evaluated (see StreamingVaeDecoder._post_quant_frame).
MIN_CONV_VOXELS = 64


def build_vae(**config: Any) -> AutoencoderKLWan:
    """``AutoencoderKLWan(**config)`` in eval mode without gradients; no arguments = the real Wan2.1 VAE."""
    vae = AutoencoderKLWan(**config)
    return vae.eval().requires_grad_(False)


def _latent_stats(vae: AutoencoderKLWan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``1/std`` as fp32 ``[1,C,1,1,1]``; the reciprocal is taken in fp32 as upstream does."""
    c = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=device).view(1, c, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std, dtype=torch.float32, device=device).view(1, c, 1, 1, 1)
    return mean, inv_std


@torch.no_grad()
def encode_latents(vae: AutoencoderKLWan, video: torch.Tensor) -> torch.Tensor:
    """Normalised posterior mode of ``video`` [B,3,F,H,W] in [-1,1] -> fp32 [B,16,1+(F-1)//4,H/8,W/8].

    The mode (not a sample, no noise augmentation) is what StableAvatar conditions on.
    """
    dtype = next(vae.parameters()).dtype
    mu = vae.encode(video.to(compute_device(vae), dtype)).latent_dist.mode()  # [B,16,t,h,w] raw mu
    mean, inv_std = _latent_stats(vae, mu.device)
    return (mu.float() - mean) * inv_std


def _decoder_cache_size(vae: AutoencoderKLWan) -> int:
    """One cache slot per causal conv of the decoder (what diffusers' ``clear_cache`` allocates)."""
    return sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())


class _DecoderStages:
    """The Wan2.1 decoder cut after each temporal upsampler: stage ``k`` runs at ``2**k`` frames per latent.

    Stage 0 is ``conv_in``, the mid block and the up blocks up to the first ``upsample3d``; the last stage ends with
    the head. :meth:`run` is ``WanDecoder3d.forward`` stopped after some stages: the same modules on the same cache
    slots in the same order, so every slot it fills holds what the full forward would put there.
    """

    def __init__(self, decoder: WanDecoder3d):
        if not isinstance(decoder, WanDecoder3d):
            raise TypeError(f"{type(decoder).__name__} is not the Wan decoder: it has no stages to cut")
        self.decoder = decoder
        cuts = [i + 1 for i, block in enumerate(decoder.up_blocks)
                if block.upsamplers is not None and block.upsamplers[0].mode == "upsample3d"]
        self.up_bounds = [0, *cuts, len(decoder.up_blocks)]  # stage k: up_blocks[up_bounds[k]:up_bounds[k + 1]]

    @property
    def count(self) -> int:
        return len(self.up_bounds) - 1

    def modules(self, stage: int) -> list[torch.nn.Module]:
        d = self.decoder
        first = [d.conv_in, d.mid_block] if stage == 0 else []
        head = [d.norm_out, d.conv_out] if stage == self.count - 1 else []
        return [*first, *d.up_blocks[self.up_bounds[stage]:self.up_bounds[stage + 1]], *head]

    def temporal_reach(self, stage: int) -> int:
        """Frames (at the stage's own rate) a stage's output looks back: its causal convolutions run in series."""
        convs = [m for top in self.modules(stage) for m in top.modules() if isinstance(m, WanCausalConv3d)]
        if any(c.stride[0] != 1 or c.dilation[0] != 1 for c in convs):
            raise ValueError("the decoder's temporal convolutions must have stride and dilation 1")
        return sum(c.kernel_size[0] - 1 for c in convs)

    def run(self, x: torch.Tensor, feat_cache: list[Any], stages: int, first_chunk: bool) -> torch.Tensor:
        """``decoder(x, feat_cache, [0], first_chunk)`` stopped after ``stages`` (fewer than all) stages."""
        d, feat_idx = self.decoder, [1]
        cache_x = x[:, :, -CACHE_T:].clone()  # conv_in and its cache slot 0, as WanDecoder3d.forward does it
        if cache_x.shape[2] < 2 and feat_cache[0] is not None:
            cache_x = torch.cat([feat_cache[0][:, :, -1:].to(cache_x.device), cache_x], dim=2)
        x = d.conv_in(x, feat_cache[0])
        feat_cache[0] = cache_x
        x = d.mid_block(x, feat_cache=feat_cache, feat_idx=feat_idx)
        for block in d.up_blocks[: self.up_bounds[stages]]:
            x = block(x, feat_cache=feat_cache, feat_idx=feat_idx, first_chunk=first_chunk)
        return x


def _stage_warm_ups(reaches: list[int]) -> tuple[int, ...]:
    """Latents before a segment that each stage must see so the segment's first frame is exact.

    Walks back from that frame: a stage whose inputs start at frame ``p`` (rate ``m``, latent ``t > 0`` holding
    frames ``m(t-1)+1 .. mt``) needs them from ``p - reach``; a temporal upsampler's output frame ``p`` comes from
    its input frame ``ceil(p/2)``. A stage started mid-stream reads zeros before its first latent, and its
    upsampler treats that first latent as zeros too; both stay outside the frames that matter as long as the
    upsampler's own inputs start a whole latent after the stage's (checked).
    """
    last = len(reaches) - 1
    segment_start = 10**6  # any latent far from the stream's start: the warm-ups do not depend on it
    rate = 2**last
    needed = rate * (segment_start - 1) + 1 - reaches[last]
    warm_ups = [segment_start - -(-needed // rate)]
    for stage in range(last - 1, -1, -1):
        rate //= 2
        if reaches[stage] - 2 < rate:
            raise ValueError("unexpected decoder layout: a temporal upsampler too close to its stage's start")
        needed = -(-needed // 2) - reaches[stage]
        warm_ups.insert(0, segment_start - -(-needed // rate))
    if any(a <= b for a, b in zip(warm_ups, warm_ups[1:], strict=False)):
        raise ValueError(f"unexpected decoder layout: stage warm-ups {warm_ups} do not decrease")
    return tuple(warm_ups)


@torch.no_grad()
def _stage_costs(vae: AutoencoderKLWan, stages: int) -> tuple[float, ...]:
    """Each stage's share of the multiply-adds of the convolutions that decode one latent inside the stream.

    Counted on a copy on the meta device (no memory, no arithmetic); every layer scales with the frame area alike,
    so a 1x1 latent gives the shares of any size (attention, which does not, is left out: a few per cent).
    """
    with torch.device("meta"):
        meta = type(vae).from_config(vae.config)
    cut = _DecoderStages(meta.decoder)
    owner = {id(m): k for k in range(stages) for top in cut.modules(k) for m in top.modules()}
    macs = [0] * stages

    def count(module: torch.nn.Module, _args: Any, out: torch.Tensor) -> None:
        kernel = int(np.prod(module.kernel_size))
        macs[owner[id(module)]] += out.numel() * module.in_channels // module.groups * kernel

    convs = [m for m in meta.decoder.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Conv3d)]
    cache: list[Any] = [None] * _decoder_cache_size(meta)
    x = torch.zeros(1, meta.config.z_dim, 1, 1, 1, device="meta")
    meta.decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=True)  # latent 0: the stream's special start
    handles = [m.register_forward_hook(count) for m in convs]
    try:
        meta.decoder(x, feat_cache=cache, feat_idx=[0])
    finally:
        for handle in handles:
            handle.remove()
    total = sum(macs)
    return tuple(m / total for m in macs)


_REACH: weakref.WeakKeyDictionary[torch.nn.Module, DecoderReach] = weakref.WeakKeyDictionary()


def decoder_reach(vae: torch.nn.Module) -> DecoderReach:
    """How many latents before a segment each decoder stage needs for the segment's frames to be exact.

    For the Wan2.1 decoder it is derived from the architecture (one per live VAE, cached): 38 latents for the
    latent-rate stage, 14 for the half-rate one, 7 for the full-rate one, at any width (tests/test_segments.py
    perturbs one latent and finds the same reach). A stand-in VAE states its reach as ``decoder_reach_latents``.
    """
    if vae in _REACH:
        return _REACH[vae]
    decoder = getattr(vae, "decoder", None)
    if isinstance(decoder, WanDecoder3d):
        if getattr(vae.config, "is_residual", False) or vae.config.patch_size is not None:
            raise ValueError("segmented decoding supports the Wan2.1 decoder (is_residual=False, no patch_size)")
        cut = _DecoderStages(decoder)
        if 2 ** (cut.count - 1) != vae.config.scale_factor_temporal:
            raise ValueError(f"{cut.count} decoder stages do not make x{vae.config.scale_factor_temporal} in time")
        warm_ups = _stage_warm_ups([cut.temporal_reach(k) for k in range(cut.count)])
        reach = DecoderReach(warm_ups, _stage_costs(vae, cut.count))
    elif isinstance(getattr(vae, "decoder_reach_latents", None), int):
        reach = DecoderReach((vae.decoder_reach_latents,), (1.0,))
    else:
        raise TypeError(f"{type(vae).__name__} has no known decoder reach: segments cannot be decoded exactly")
    _REACH[vae] = reach
    return reach


def preset_decoder_reach(preset: ModelPreset) -> DecoderReach:
    """:func:`decoder_reach` of ``preset``'s VAE without its weights (built on the meta device): for a planner that
    holds no model."""
    with torch.device("meta"):
        vae = preset.vae_factory() if preset.vae_factory is not None else build_vae(**preset.vae)
    return decoder_reach(vae)


class StreamingVaeDecoder:
    """Decodes normalised latents [1,16,T,h,w] one latent frame at a time, carrying the causal cache across calls.

    This re-implements diffusers' ``AutoencoderKLWan._decode`` loop (``post_quant_conv``, then the decoder on one
    latent frame with ``feat_cache``/``feat_idx``, ``first_chunk=True`` only for the stream's global latent 0), so
    the frames equal a one-shot ``vae.decode`` while memory stays constant in T: the cache holds at most 2 frames
    per causal conv, and frames are handed out as soon as they exist instead of being concatenated. The output
    is identical however the latents are chunked (``decode`` or any ``feed`` split), on any backend; it is
    bit-identical to ``vae.decode`` on one CPU thread (golden tests) and can differ in the last bits elsewhere,
    because of ``post_quant_conv`` only (see ``_post_quant_frame``). A stream may also begin in the middle of the
    video (``warm_up``): its frames are those of the stream from latent 0, bit for bit (docs/long-videos.md).
    Decoding chunks with separate ``vae.decode`` calls would be wrong (cache reset: wrong frame count and seams).

    Concurrency rule: one VAE instance must not decode two streams concurrently, and one decoder object is one
    stream (not thread-safe). Decoding holds activations and a cache sized for the full frame resolution, so the
    service budgets VAE memory for one stream per instance. The causal cache (the list diffusers would keep in
    ``vae._feat_map``) is owned by this object rather than the module, so a ``vae.encode``/``vae.decode``
    elsewhere (which call ``clear_cache``) cannot silently corrupt a running stream.
    VAE tiling (``enable_tiling``) is ignored: tiles blend approximately and would break bit-exactness.
    """

    def __init__(self, vae: AutoencoderKLWan, clamp: bool = True):
        self.vae = vae
        self.clamp = clamp
        self._cache_size = _decoder_cache_size(vae)
        self._feat_map: list[Any] | None = None
        self._next_latent = 0
        self.reset()

    def reset(self) -> None:
        """Start a new stream: empty causal cache, next latent is global latent 0."""
        self._feat_map = [None] * self._cache_size
        self._next_latent = 0

    def close(self) -> None:
        """Free the cache tensors (a few frames per conv) once the stream is done."""
        self._feat_map = None

    @property
    def latents_seen(self) -> int:
        """How many latent frames this stream has decoded since ``reset``."""
        return self._next_latent

    def _prepare(self) -> tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]:
        """Offload hook (what diffusers' ``@apply_forward_hook`` does for ``decode``), then device/dtype and stats."""
        vae = self.vae
        if self._feat_map is None:
            raise RuntimeError("StreamingVaeDecoder was closed; call reset() to start a new stream")
        hook = getattr(vae, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(vae)
        param = next(vae.post_quant_conv.parameters())
        mean, inv_std = _latent_stats(vae, param.device)
        return param, mean, inv_std

    @torch.no_grad()
    def _post_quant_frame(self, z: torch.Tensor) -> torch.Tensor:
        """Un-normalise one latent frame [1,16,1,h,w] and apply the 1x1x1 ``post_quant_conv`` (VAE dtype).

        diffusers runs this conv once over the whole latent. It is pointwise, but the GEMM behind it is chosen
        by its width, and some choices accumulate in another order (last-bit differences, ~5e-6 after the
        decoder): on one CPU thread below 12 voxels; with several threads (oneDNN) even at 64x64 latents. So it
        is always evaluated on the same shape, one frame zero-padded in time to at least ``MIN_CONV_VOXELS``
        voxels: the stream's output then never depends on how the latents were chunked, and on one CPU thread it
        equals diffusers' whole-tensor conv (checked by the golden tests).
        """
        param, mean, inv_std = self._prepare()
        z = (z.to(param.device, torch.float32) / inv_std + mean).to(param.dtype)  # [1,16,1,h,w]
        frames = max(1, -(-MIN_CONV_VOXELS // (z.shape[3] * z.shape[4])))
        if frames > 1:
            z = torch.cat([z, z.new_zeros(*z.shape[:2], frames - 1, *z.shape[3:])], dim=2)  # [1,16,k,h,w]
        return self.vae.post_quant_conv(z)[:, :, :1]

    @torch.no_grad()
    def _decode_frame(self, x: torch.Tensor) -> torch.Tensor:
        """One post-quant latent frame [1,16,1,h,w] -> pixels [1,3,f,H,W] (f = 1 for latent 0, else 4), unclamped."""
        vae = self.vae
        out = vae.decoder(
            x, feat_cache=self._feat_map, feat_idx=[0], first_chunk=self._next_latent == 0
        )  # [1,3*p*p,f,H/p,W/p]
        if vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=vae.config.patch_size)
        self._next_latent += 1
        return out  # [1,3,f,H,W]

    def _finish(self, frames: torch.Tensor, clamp: bool | None) -> torch.Tensor:
        return torch.clamp(frames, min=-1.0, max=1.0) if (self.clamp if clamp is None else clamp) else frames

    @staticmethod
    def _check(latents: torch.Tensor) -> None:
        if latents.ndim != 5 or latents.shape[0] != 1 or latents.shape[2] == 0:
            raise ValueError(f"expected normalised latents [1,C,t>0,h,w], got {tuple(latents.shape)}")

    def feed(self, latents: torch.Tensor, clamp: bool | None = None) -> torch.Tensor:
        """Decode the next consecutive chunk [1,16,t,h,w] of the stream -> [1,3,4t (-3 if it holds latent 0),H,W]."""
        self._check(latents)
        outs = [self._decode_frame(self._post_quant_frame(latents[:, :, i : i + 1])) for i in range(latents.shape[2])]
        return self._finish(torch.cat(outs, dim=2) if len(outs) > 1 else outs[0], clamp)

    @torch.no_grad()
    def warm_up(self, latents: torch.Tensor, reach: DecoderReach | None = None) -> None:
        """Start a new stream that continues right after ``latents`` [1,16,n,h,w], the latents before a segment:
        the next ``feed`` gives exactly (bit for bit) the frames of a stream that started at latent 0.

        ``latents`` are the :func:`decoder_reach` latents before the segment, or fewer when they start at latent 0
        (then they are that stream's own beginning); more are cut to the reach. Their frames are not made: each
        latent runs only through the decoder stages the segment's frames depend on, so a full warm-up costs
        ``decoder_reach(vae).warm_up_cost`` latents' decoding, not ``latents``. A shorter ``reach`` than the
        decoder's gives approximate frames (how the tests and the benchmark show that the reach is tight).
        """
        if latents.ndim != 5 or latents.shape[0] != 1:
            raise ValueError(f"expected normalised latents [1,C,t,h,w], got {tuple(latents.shape)}")
        reach = reach or decoder_reach(self.vae)
        stages = len(reach.stage_latents)
        cut = _DecoderStages(self.vae.decoder) if stages > 1 else None
        if cut is not None and cut.count != stages:
            raise ValueError(f"a reach of {stages} stages for a decoder of {cut.count}")
        self.reset()
        latents = latents[:, :, max(0, latents.shape[2] - reach.latents):]
        count = latents.shape[2]
        for i in range(count):
            depth = sum(w >= count - i for w in reach.stage_latents)  # stages this latent must run through
            x = self._post_quant_frame(latents[:, :, i : i + 1])
            if depth == stages:
                self._decode_frame(x)
            else:
                assert cut is not None
                cut.run(x, self._feat_map, depth, first_chunk=self._next_latent == 0)
                self._next_latent += 1

    def decode(self, latents: torch.Tensor, clamp: bool | None = None) -> Iterator[torch.Tensor]:
        """Decode a whole latent [1,16,T,h,w] as a new stream, yielding [1,3,1,H,W] then [1,3,4,H,W] per latent."""
        self._check(latents)
        self.reset()
        try:
            for i in range(latents.shape[2]):
                yield self.feed(latents[:, :, i : i + 1], clamp=clamp)
        finally:
            self.close()


def frames_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Decoded frames [1,3,f,H,W] in [-1,1] -> uint8 [f,H,W,3] for the video encoder, rounding to nearest."""
    x = frames[0].detach().float().permute(1, 2, 3, 0)  # [f,H,W,3]
    x = ((x / 2 + 0.5).clamp(0, 1) * 255).round()
    return x.to(torch.uint8).cpu().numpy()
