"""The image conditioning StableAvatar gives every window: ``y`` (mask + reference latents) and the CLIP context.

Upstream builds one 81-frame clip (the reference frame followed by 80 zero = mid-grey frames), VAE-encodes it
once, and slices the same ``y`` for every window, so every window is told "my frame 0 is the reference image".
Callers repeat both tensors x3 for the CFG batch.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from transformers import CLIPVisionModel

from pipeline.models.image_encoder import encode_image_tokens
from pipeline.models.vae import encode_latents

MASK_CHANNELS = 4  # the temporal VAE stride: the pixel-frame mask is folded 4 frames per latent frame


def image_to_tensor(image_u8: np.ndarray) -> torch.Tensor:
    """uint8 [H,W,3] -> fp32 [3,H,W] in [-1,1] as upstream computes it: ``(u8/255 - 0.5) * 2``."""
    if image_u8.dtype != np.uint8 or image_u8.ndim != 3 or image_u8.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB image [H,W,3], got {image_u8.dtype} {image_u8.shape}")
    x = torch.from_numpy(np.ascontiguousarray(image_u8)).permute(2, 0, 1).float()  # [3,H,W]
    return (x / 255 - 0.5) * 2


def reference_video(image_u8: np.ndarray, num_frames: int = 81) -> torch.Tensor:
    """uint8 [H,W,3] -> [1,3,num_frames,H,W]: the reference as frame 0, then zero (mid-grey) frames."""
    img = image_to_tensor(image_u8)  # [3,H,W]
    video = torch.zeros(1, 3, num_frames, *img.shape[1:], dtype=img.dtype)
    video[0, :, 0] = img
    return video


def build_y(vae: AutoencoderKLWan, image_u8: np.ndarray, num_frames: int = 81) -> torch.Tensor:
    """uint8 [H,W,3] -> y [1,4+16,1+(num_frames-1)//4,H/8,W/8]: mask (1 on latent frame 0) then latents."""
    latents = encode_latents(vae, reference_video(image_u8, num_frames))  # [1,16,t,h,w] normalised mode
    mask = torch.zeros(1, MASK_CHANNELS, *latents.shape[2:], dtype=latents.dtype, device=latents.device)
    mask[:, :, 0] = 1.0  # [1,4,t,h,w]
    return torch.cat([mask, latents], dim=1)


def build_clip_context(image_encoder: CLIPVisionModel, image_u8: np.ndarray) -> torch.Tensor:
    """uint8 [H,W,3] -> CLIP tokens [1,257,d] (all but the last block) of the same stretched reference image."""
    return encode_image_tokens(image_encoder, image_to_tensor(image_u8))
