"""``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` (open-clip XLM-R ViT-H/14) -> ``CLIPVisionModel``.

Only the image tower is used. ``textual.*`` and ``log_scale`` (the text tower and contrastive temperature) and
``visual.head`` (the projection to the joint space) are accepted and dropped. ``visual.post_norm`` is optional:
StableAvatar takes tokens before it, but when present it is loaded into ``post_layernorm`` so the module is whole
(``pooler_output`` correct); when absent ``post_layernorm`` is set to the identity. Every other ``visual.*`` key
is required, and any key outside these families is an error.

transformers 5.x ``CLIPVisionModel.state_dict()`` names have no ``vision_model.`` prefix.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import CLIPVisionModel

from pipeline.keymaps import CheckpointKeyError
from pipeline.keymaps.files import load_checked

COMPONENT = "image_encoder"
DROPPED_PREFIXES = ("textual.",)
DROPPED_KEYS = ("log_scale", "visual.head")
POST_NORM = {"visual.post_norm.weight": "post_layernorm.weight", "visual.post_norm.bias": "post_layernorm.bias"}


def image_encoder_key_map(num_layers: int) -> dict[str, str]:
    """Required original name -> CLIPVisionModel name (``to_qkv`` maps to a placeholder, split in conversion)."""
    table = {
        "visual.patch_embedding.weight": "embeddings.patch_embedding.weight",  # no bias on either side
        "visual.cls_embedding": "embeddings.class_embedding",  # [1,1,d] -> [d]
        "visual.pos_embedding": "embeddings.position_embedding.weight",  # [1,257,d] -> [257,d]
        "visual.pre_norm.weight": "pre_layrnorm.weight",
        "visual.pre_norm.bias": "pre_layrnorm.bias",
    }
    for i in range(num_layers):
        src, dst = f"visual.transformer.{i}", f"encoder.layers.{i}"
        for p in ("weight", "bias"):
            table[f"{src}.norm1.{p}"] = f"{dst}.layer_norm1.{p}"
            table[f"{src}.norm2.{p}"] = f"{dst}.layer_norm2.{p}"
            table[f"{src}.attn.to_qkv.{p}"] = f"{dst}.self_attn.{{q,k,v}}_proj.{p}"
            table[f"{src}.attn.proj.{p}"] = f"{dst}.self_attn.out_proj.{p}"
            table[f"{src}.mlp.0.{p}"] = f"{dst}.mlp.fc1.{p}"
            table[f"{src}.mlp.2.{p}"] = f"{dst}.mlp.fc2.{p}"
    return table


def _is_dropped(key: str) -> bool:
    return key in DROPPED_KEYS or key.startswith(DROPPED_PREFIXES)


def convert_image_encoder_state_dict(
    sd: Mapping[str, torch.Tensor], num_layers: int, hidden_size: int
) -> dict[str, torch.Tensor]:
    """Check original names (required visual keys present, nothing unknown), then rename/reshape/split."""
    table = image_encoder_key_map(num_layers)
    missing = set(table) - set(sd)
    unexpected = {k for k in sd if k not in table and k not in POST_NORM and not _is_dropped(k)}
    if missing or unexpected:
        raise CheckpointKeyError(COMPONENT, missing, unexpected)

    out: dict[str, torch.Tensor] = {}
    for src, dst in table.items():
        value = sd[src]
        if ".attn.to_qkv." in src:  # fused [3d(,d)] -> q, k, v in that order
            for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                out[dst.replace("{q,k,v}", name)] = part
        elif src == "visual.cls_embedding":
            out[dst] = value.reshape(hidden_size)
        elif src == "visual.pos_embedding":
            out[dst] = value.reshape(-1, hidden_size)
        else:
            out[dst] = value
    if all(k in sd for k in POST_NORM):
        out.update({dst: sd[src] for src, dst in POST_NORM.items()})
    elif any(k in sd for k in POST_NORM):
        raise CheckpointKeyError(COMPONENT, [k for k in POST_NORM if k not in sd], [])
    else:  # unused by StableAvatar (tokens are taken before it): make it an explicit identity
        ref = out["pre_layrnorm.weight"]
        out["post_layernorm.weight"] = torch.ones_like(ref)
        out["post_layernorm.bias"] = torch.zeros_like(ref)
    return out


def load_image_encoder_weights(
    model: CLIPVisionModel, sd: Mapping[str, torch.Tensor], *, assign: bool = False
) -> None:
    """Strictly load the visual tower of an original open-clip XLM-R checkpoint into ``model``."""
    cfg = model.config
    converted = convert_image_encoder_state_dict(sd, cfg.num_hidden_layers, cfg.hidden_size)
    load_checked(COMPONENT, model, converted, assign=assign)
