"""CLIP ViT-H/14 image tower (``transformers.CLIPVisionModel``) as Wan/StableAvatar uses it.

The DiT's image context is the 257 tokens after all but the last transformer block, before ``post_layernorm``
(upstream ``use_31_block=True``). Preprocessing is upstream's: a plain bicubic stretch to 224x224 of the whole
image, not ``CLIPImageProcessor``'s short-side resize and centre crop.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

from .devices import compute_device

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_image_encoder(**config: Any) -> CLIPVisionModel:
    """``CLIPVisionModel(CLIPVisionConfig(**config))`` in eval mode without gradients."""
    model = CLIPVisionModel(CLIPVisionConfig(**config))
    return model.eval().requires_grad_(False)


def clip_preprocess(image: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Image [3,H,W] in [-1,1] -> normalised [1,3,size,size] fp32, with upstream's op order (bit-exact)."""
    x = F.interpolate(image[None].float(), size=(size, size), mode="bicubic", align_corners=False)  # [1,3,224,224]
    x = x * 0.5 + 0.5  # [-1,1] -> [0,1]
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def encode_image_tokens(model: CLIPVisionModel, image: torch.Tensor) -> torch.Tensor:
    """Image [3,H,W] in [-1,1] -> tokens [1,257,dim] after all but the last block (``hidden_states[-2]``)."""
    pixels = clip_preprocess(image.to(compute_device(model)))  # [1,3,224,224]
    pixels = pixels.to(model.embeddings.patch_embedding.weight.dtype)
    out = model(pixel_values=pixels, output_hidden_states=True)
    return out.hidden_states[-2]  # [1,257,dim]; hidden_states[0] is the embedding after pre_layrnorm
