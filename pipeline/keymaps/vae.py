"""``Wan2.1_VAE.pth`` (original Wan names) -> diffusers ``AutoencoderKLWan``.

The renaming itself is diffusers' ``convert_wan_vae_to_diffusers``. That function passes unknown keys through
unchanged and silently skips absent ones, so we first check the file against the exact list of names the original
``WanVAE`` module would write for this config; errors therefore name keys as the user's file spells them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from pipeline.keymaps import check_keys, check_original_keys
from pipeline.keymaps.files import load_checked

COMPONENT = "vae"


def _residual(prefix: str, in_dim: int, out_dim: int) -> list[str]:
    """Original ``ResidualBlock``: RMS_norm(0), conv(2), RMS_norm(3), conv(6), optional 1x1x1 shortcut."""
    keys = [f"{prefix}.residual.0.gamma", f"{prefix}.residual.3.gamma"]
    keys += [f"{prefix}.residual.{i}.{p}" for i in (2, 6) for p in ("weight", "bias")]
    if in_dim != out_dim:
        keys += [f"{prefix}.shortcut.weight", f"{prefix}.shortcut.bias"]
    return keys


def _resample(prefix: str, temporal: bool) -> list[str]:
    """Original ``Resample``: a 2D conv at ``resample.1`` plus, for the 3D modes, a causal ``time_conv``."""
    keys = [f"{prefix}.resample.1.weight", f"{prefix}.resample.1.bias"]
    if temporal:
        keys += [f"{prefix}.time_conv.weight", f"{prefix}.time_conv.bias"]
    return keys


def _middle(prefix: str) -> list[str]:
    """Residual, attention, residual (the attention block is always present in the middle)."""
    keys = []
    for i in (0, 2):
        keys += [f"{prefix}.middle.{i}.residual.0.gamma", f"{prefix}.middle.{i}.residual.3.gamma"]
        keys += [f"{prefix}.middle.{i}.residual.{j}.{p}" for j in (2, 6) for p in ("weight", "bias")]
    keys += [f"{prefix}.middle.1.norm.gamma"]
    keys += [f"{prefix}.middle.1.{m}.{p}" for m in ("to_qkv", "proj") for p in ("weight", "bias")]
    return keys


def original_vae_keys(vae: AutoencoderKLWan) -> list[str]:
    """Every key of ``Wan2.1_VAE.pth`` for the config of ``vae`` (194 for the tiny golden config, as for the real one).

    Mirrors the original ``Encoder3d``/``Decoder3d`` construction loops. Only the Wan2.1 layout that diffusers'
    converter understands is supported (no attention scales, 2 residual blocks per level, 4 levels).
    """
    cfg = vae.config
    if cfg.attn_scales or cfg.num_res_blocks != 2 or len(cfg.dim_mult) != 4 or cfg.is_residual or cfg.patch_size:
        raise ValueError("only the Wan2.1 VAE layout (attn_scales=[], num_res_blocks=2, 4 levels) has a key map")
    dim, mult, n_res = cfg.base_dim, list(cfg.dim_mult), cfg.num_res_blocks
    down_t = list(cfg.temperal_downsample)
    keys = [f"{p}.{s}" for p in ("conv1", "conv2") for s in ("weight", "bias")]  # quant convs

    # Encoder: per level n_res residual blocks, then a down-sampler except after the last level.
    dims = [dim * m for m in [1, *mult]]
    keys += ["encoder.conv1.weight", "encoder.conv1.bias"]
    idx = 0
    for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        for _ in range(n_res):
            keys += _residual(f"encoder.downsamples.{idx}", in_dim, out_dim)
            in_dim, idx = out_dim, idx + 1
        if level != len(mult) - 1:
            keys += _resample(f"encoder.downsamples.{idx}", temporal=down_t[level])
            idx += 1
    keys += _middle("encoder")
    keys += ["encoder.head.0.gamma", "encoder.head.2.weight", "encoder.head.2.bias"]

    # Decoder: per level n_res + 1 residual blocks (input halved after each up-sampler), then an up-sampler.
    up_t = down_t[::-1]
    dims = [dim * m for m in [mult[-1], *mult[::-1]]]
    keys += ["decoder.conv1.weight", "decoder.conv1.bias"]
    idx = 0
    for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        if level > 0:
            in_dim //= 2
        for _ in range(n_res + 1):
            keys += _residual(f"decoder.upsamples.{idx}", in_dim, out_dim)
            in_dim, idx = out_dim, idx + 1
        if level != len(mult) - 1:
            keys += _resample(f"decoder.upsamples.{idx}", temporal=up_t[level])
            idx += 1
    keys += _middle("decoder")
    keys += ["decoder.head.0.gamma", "decoder.head.2.weight", "decoder.head.2.bias"]
    return keys


def convert_vae_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original names -> diffusers names (pure renaming; no key check, see ``load_vae_weights``)."""
    return convert_wan_vae_to_diffusers(dict(sd))


def load_vae_weights(vae: AutoencoderKLWan, sd: Mapping[str, torch.Tensor], *, assign: bool = False) -> None:
    """Check ``sd`` (original names) against the exact expected list, convert, and load strictly."""
    expected = original_vae_keys(vae)
    # Guard against a diffusers upgrade changing the converter: our list must convert onto the model exactly.
    check_keys(COMPONENT + " (key-map self-check)", vae.state_dict().keys(),
               convert_wan_vae_to_diffusers(dict.fromkeys(expected)).keys())
    check_original_keys(COMPONENT, sd, expected)
    load_checked(COMPONENT, vae, convert_vae_state_dict(sd), assign=assign)
