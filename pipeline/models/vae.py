"""The Wan2.1 causal video VAE (diffusers ``AutoencoderKLWan``): encode, and streaming decode.

Latent normalisation lives outside the diffusers VAE (the StableAvatar wrapper has it inside), so it is done here,
in the exact float forms upstream uses: ``(mu - mean) * (1/std)`` on encode and ``z / (1/std) + mean`` on decode.
Both reproduce the golden vectors bit for bit; ``(mu - mean) / std`` does not.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify

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


class StreamingVaeDecoder:
    """Decodes normalised latents [1,16,T,h,w] one latent frame at a time, carrying the causal cache across calls.

    This re-implements diffusers' ``AutoencoderKLWan._decode`` loop (``post_quant_conv``, then the decoder on one
    latent frame with ``feat_cache``/``feat_idx``, ``first_chunk=True`` only for the stream's global latent 0), so
    the frames equal a one-shot ``vae.decode`` while memory stays constant in T: the cache holds at most 2 frames
    per causal conv, and frames are handed out as soon as they exist instead of being concatenated. The output
    is identical however the latents are chunked (``decode`` or any ``feed`` split), on any backend; it is
    bit-identical to ``vae.decode`` on one CPU thread (golden tests) and can differ in the last bits elsewhere,
    because of ``post_quant_conv`` only (see ``_post_quant_frame``).
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
