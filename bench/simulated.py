"""Stand-in models for benchmarks, registered as presets when this module is imported.

The service loads them through the app args' ``preset_modules: [bench.simulated]`` (imported in every replica), so
the runtime loader has no benchmark code in it.

``simulated`` (and ``simulated-fast``): the tiny preset whose DiT sleeps a fixed time per guidance row of the batch (0.5 s,
about one row-forward of the real 1.3B model at 480x832 on a datacenter GPU, so a batch-3 unit takes 1.5 s) and
returns a deterministic tensor: benchmarks of the fan-out measure scheduling, not arithmetic. It also offers the
step cache's interface (``timestep_modulation``, ``block_residual``): a reused residual skips the sleep.

``simulated-decoder`` (and ``simulated-decoder-dit``, whose DiT sleeps 0.05 s per row): the tiny preset whose VAE
decoder sleeps a fixed time per decoded frame (:class:`SleepingVae`), so decode + encode on several Postprocessor
replicas can be measured through Serve on two CPU cores (bench/bench_segments.py).

``simulated-realsize``: the real geometry (480x832, 832x480, 512x512; latents [1,16,T,h,w] with the real h, w and
T) with near-free arithmetic, so a benchmark can push 600 s of video through the Orchestrator, the object store, the
Postprocessor and ffmpeg on a CPU (bench/bench_long_video.py). The DiT is :class:`ConvergingTransformer` (no
sleep); the VAE is :class:`UpsamplingVae`, with the real x8 spatial / x4 temporal factors and the causal-cache
interface the streaming decoder drives; the encoders are the tiny ones, except wav2vec's width, which is the real
768 so the per-window audio features (the part of the conditioning that grows with length) have their real size.
The tiny Wan VAE itself decodes 480x832 at well under 1 frame/s on two CPU cores (bench/results/long_video.txt),
which would turn 15000 frames into hours of decoding.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from collections.abc import Sequence
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from pipeline.presets import PRESETS, REAL_RESOLUTIONS, TINY_AUDIO_ENCODER, register_preset

SIMULATED_ROW_S = 0.5  # seconds per guidance row of a forward
SIMULATED_FRAME_S = 0.01  # seconds per decoded frame of the sleeping VAE (simulated-decoder presets)
SLEEPING_VAE_REACH = 10  # latents a segment of the sleeping VAE warms up on: the Wan2.1 warm-up costs 9.8
REAL_AUDIO_DIM = 768  # wav2vec2-base hidden size: the width of the per-window audio features
SPATIAL, TEMPORAL = 8, 4  # the Wan VAE's factors


class SimulatedTransformer(torch.nn.Module):
    """Same call signature as ``StableAvatarTransformer3DModel.forward``; no arithmetic worth measuring."""

    def __init__(self, row_s: float):
        super().__init__()
        self.row_s = row_s
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device and dtype

    def forward(self, latents: torch.Tensor, y: torch.Tensor, timestep: torch.Tensor, text_context: Sequence,
                clip_fea: torch.Tensor, audio_features: torch.Tensor | None, audio_rows: Sequence[bool],
                seq_len: int, return_dict: bool = True, block_residual=None,
                **_: object) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        # [B, 16, L, h, w]: a deterministic function of the inputs, so runs can be compared bit for bit.
        if block_residual is not None and block_residual.reuse is not None:
            residual = block_residual.reuse.to(latents.dtype)  # the blocks are skipped: no sleep
        else:
            time.sleep(self.row_s * latents.shape[0])
            residual = (timestep.view(-1, 1, 1, 1, 1) / 1000).to(latents.dtype).expand_as(latents).clone()
            if block_residual is not None:
                block_residual.computed = residual
        output = latents * 0.5 + residual
        return (output,) if not return_dict else Transformer2DModelOutput(sample=output)

    def timestep_modulation(self, timesteps: torch.Tensor) -> torch.Tensor:
        """A stand-in ``e0`` ``[N, 6, 4]`` that moves with the timestep (1-3 % per step early on)."""
        return (1.0 + timesteps.float().view(-1, 1, 1) / 1000).expand(-1, 6, 4).clone()

    def to_inference_dtype(self, dtype: torch.dtype) -> SimulatedTransformer:
        return self.to(dtype)


class ConvergingTransformer(SimulatedTransformer):
    """Predicts the flow velocity towards the reference frame's latent (``y``'s channels 4.. at frame 0), keeping
    a fraction ``keep`` of the current sample: the last step lands on the reference plus a little of the noise.
    Decoded, that is a slightly flickering portrait rather than pure noise, so ffmpeg sees video-like content
    (its speed and the file size depend on the content; pure noise would be the worst case). A reused residual
    (step cache) is the prediction itself."""

    def __init__(self, row_s: float = 0.0, keep: float = 0.05):
        super().__init__(row_s)
        self.keep = keep

    def forward(self, latents: torch.Tensor, y: torch.Tensor, timestep: torch.Tensor, text_context: Sequence,
                clip_fea: torch.Tensor, audio_features: torch.Tensor | None, audio_rows: Sequence[bool],
                seq_len: int, return_dict: bool = True, block_residual=None,
                **_: object) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        if block_residual is not None and block_residual.reuse is not None:
            output = block_residual.reuse.to(latents.dtype)
        else:
            if self.row_s:
                time.sleep(self.row_s * latents.shape[0])
            reference = y[:, 4:, :1]  # [B, 16, 1, h, w]
            sigma = (timestep.float() / 1000).view(-1, 1, 1, 1, 1)
            # x0 = ref + keep·(x − ref), v = (x − x0)/σ
            output = ((1 - self.keep) * (latents.float() - reference.float()) / sigma).to(latents.dtype)
            if block_residual is not None:
                block_residual.computed = output
        return (output,) if not return_dict else Transformer2DModelOutput(sample=output)


def _wan_latent_stats() -> tuple[list[float], list[float]]:
    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    return list(params["latents_mean"].default), list(params["latents_std"].default)


class _UpsamplingDecoder(torch.nn.Module):
    """Latent frame [1,16,1,h,w] -> pixels [1,3,f,8h,8w]: the first 3 channels, interpolated in time from the
    previous latent frame (kept in the causal cache, as the Wan decoder keeps its conv inputs) and bilinearly
    upsampled; f = 1 for the stream's first latent, else 4."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.to_rgb = WanCausalConv3d(z_dim, 3, kernel_size=1)  # one causal-cache slot for the streaming decoder
        with torch.no_grad():
            self.to_rgb.weight.zero_()
            self.to_rgb.bias.zero_()
            for c in range(3):
                self.to_rgb.weight[c, c] = 1.0

    def forward(self, x: torch.Tensor, feat_cache: list | None = None, feat_idx: list[int] | None = None,
                first_chunk: bool = False) -> torch.Tensor:
        rgb = self.to_rgb(x)  # [1,3,1,h,w]
        previous = None
        if feat_cache is not None and feat_idx is not None:
            previous, feat_cache[feat_idx[0]] = feat_cache[feat_idx[0]], rgb
            feat_idx[0] += 1
        if first_chunk or previous is None:
            frames = rgb
        else:
            weights = torch.arange(1, TEMPORAL + 1, dtype=rgb.dtype, device=rgb.device).view(1, 1, -1, 1, 1)
            frames = previous + (rgb - previous) * (weights / TEMPORAL)  # [1,3,4,h,w]
        b, c, f, h, w = frames.shape
        flat = frames.transpose(1, 2).reshape(b * f, c, h, w)
        up = F.interpolate(flat, scale_factor=SPATIAL, mode="bilinear", align_corners=False)
        return up.reshape(b, f, c, h * SPATIAL, w * SPATIAL).transpose(1, 2)


class UpsamplingVae(torch.nn.Module):
    """A VAE stand-in with the Wan VAE's interface (``config``, ``encode(...).latent_dist.mode()``,
    ``post_quant_conv``, ``decoder(x, feat_cache, feat_idx, first_chunk)``) and factors, at the cost of a pooling
    and a bilinear upsampling: encode averages 8x8 pixels and 4 frames (the first frame alone, as the causal VAE),
    decode interpolates back."""

    # Latent t's frames blend latents t-1 and t: a segment's warm-up is one latent (pipeline.models.vae.decoder_reach).
    decoder_reach_latents = 1

    def __init__(self, z_dim: int = 16):
        super().__init__()
        mean, std = _wan_latent_stats()
        self.config = SimpleNamespace(z_dim=z_dim, latents_mean=mean, latents_std=std, patch_size=None)
        self.post_quant_conv = torch.nn.Conv3d(z_dim, z_dim, 1)
        self.from_rgb = torch.nn.Conv3d(3, z_dim, 1)
        with torch.no_grad():
            self.post_quant_conv.weight.copy_(torch.eye(z_dim).view(z_dim, z_dim, 1, 1, 1))
            self.post_quant_conv.bias.zero_()
            self.from_rgb.weight.copy_(torch.eye(3).repeat(-(-z_dim // 3), 1)[:z_dim].view(z_dim, 3, 1, 1, 1))
            self.from_rgb.bias.zero_()
        self.decoder = _UpsamplingDecoder(z_dim)

    def encode(self, video: torch.Tensor) -> SimpleNamespace:
        """[B,3,F,H,W] in [-1,1] -> raw latents [B,16,1+(F-1)//4,H/8,W/8] behind ``.latent_dist.mode()``."""
        pooled = F.avg_pool3d(video, kernel_size=(1, SPATIAL, SPATIAL))  # [B,3,F,h,w]
        rest = pooled[:, :, 1:]
        rest = rest[:, :, : rest.shape[2] // TEMPORAL * TEMPORAL]
        groups = rest.unflatten(2, (-1, TEMPORAL)).mean(3)
        mu = self.from_rgb(torch.cat([pooled[:, :, :1], groups], dim=2))
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: mu))


class _SleepingDecoder(_UpsamplingDecoder):
    """:class:`_UpsamplingDecoder` that also sleeps ``frame_s`` per frame it makes: a decoder on its own GPU (the
    sleep leaves the CPU to the other replicas, so several replicas on a 2-core box decode at once)."""

    def __init__(self, z_dim: int, frame_s: float):
        super().__init__(z_dim)
        self.frame_s = frame_s

    def forward(self, x: torch.Tensor, feat_cache: list | None = None, feat_idx: list[int] | None = None,
                first_chunk: bool = False) -> torch.Tensor:
        frames = super().forward(x, feat_cache, feat_idx, first_chunk)
        time.sleep(self.frame_s * frames.shape[2])
        return frames


class SleepingVae(UpsamplingVae):
    """:class:`UpsamplingVae` whose decoder costs ``frame_s`` seconds per frame, with a warm-up of
    :data:`SLEEPING_VAE_REACH` latents (its frames depend on one latent back, so any warm-up of at least one is exact;
    ten costs what the Wan2.1 decoder's warm-up costs, 9.8 latents' decoding)."""

    decoder_reach_latents = SLEEPING_VAE_REACH

    def __init__(self, frame_s: float = SIMULATED_FRAME_S, z_dim: int = 16):
        super().__init__(z_dim)
        self.decoder = _SleepingDecoder(z_dim, frame_s)


def simulated_decoder_preset(frame_s: float = SIMULATED_FRAME_S, row_s: float = 0.0,
                             name: str = "simulated-decoder"):
    """The tiny preset with the sleeping VAE (``frame_s`` per decoded frame) and a DiT sleeping ``row_s`` per
    guidance row: decode + encode on several Postprocessor replicas, measured through Serve on a CPU."""
    return dataclasses.replace(
        PRESETS["tiny"], name=name, transformer_factory=functools.partial(SimulatedTransformer, row_s),
        vae_factory=functools.partial(SleepingVae, frame_s),
        description=f"tiny preset whose VAE decoder sleeps {frame_s} s per frame and DiT {row_s} s per guidance "
                    "row (benchmarks of segmented decoding; output is a blurred copy of the noise)",
    )


def simulated_preset(row_s: float = SIMULATED_ROW_S, name: str = "simulated"):
    """The tiny preset whose DiT is a :class:`SimulatedTransformer` sleeping ``row_s`` per guidance row."""
    return dataclasses.replace(
        PRESETS["tiny"], name=name, transformer_factory=functools.partial(SimulatedTransformer, row_s),
        description=f"tiny preset whose DiT sleeps {row_s} s per guidance row (benchmarks; output is noise)",
    )


def simulated_realsize_preset(name: str = "simulated-realsize"):
    """Real resolutions and latent shapes, stand-in DiT and VAE, tiny text/image encoders, real-width wav2vec."""
    return dataclasses.replace(
        PRESETS["tiny"], name=name, resolutions=dict(REAL_RESOLUTIONS),
        transformer_factory=ConvergingTransformer, vae_factory=UpsamplingVae,
        audio_encoder=dict(TINY_AUDIO_ENCODER, hidden_size=REAL_AUDIO_DIM),
        description="real geometry (480x832 ...), stand-in DiT and VAE (benchmarks of length; output is a "
                    "flickering, blurred copy of the image)",
    )


register_preset(simulated_preset())
register_preset(simulated_preset(0.2, "simulated-fast"))  # tests of placement and fairness
register_preset(simulated_realsize_preset())
register_preset(simulated_preset(0.0, "simulated-instant"))  # dispatcher throughput (bench/bench_jobs.py)
register_preset(simulated_decoder_preset())  # decode + encode on Postprocessor replicas (bench/bench_segments.py)
register_preset(simulated_decoder_preset(row_s=0.05, name="simulated-decoder-dit"))  # end to end, same bench
