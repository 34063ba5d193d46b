"""Key map: StableAvatar / Wan-original transformer checkpoints -> ``StableAvatarTransformer3DModel``.

The official layout is the base ``diffusion_pytorch_model.safetensors`` (Wan2.1-Fun-V1.1-1.3B-InP) followed by
``transformer3d-square.pt`` (a full StableAvatar state dict that overrides it). Both use Wan-original names. The base
may also come as ``.bin`` or as hub shards with an index; the ``.pt`` may be a wrapped training checkpoint with
``module.``/``_orig_mod.`` prefixes (``pipeline.keymaps.files`` reduces all of them to one flat dict).

- Base keys, ``blocks.N.cross_attn.k_vocal/v_vocal`` included, go through diffusers' own
  ``convert_wan_transformer_to_diffusers`` (``cross_attn -> attn2``, ``norm2 <-> norm3``, ``modulation ->
  scale_shift_table``, ...). ``k_vocal``/``v_vocal`` come out as ``blocks.N.attn2.k_vocal.*`` without extra rules.
- ``vocal_projector.*`` is split off first and kept unchanged: the module uses the checkpoint's names, and the
  converter's substring renames (``cross_attn``, ``.q.``, ``norm3``, ``modulation``, ``ffn.0``) would mangle it.
- Loading is strict, and errors name keys in the checkpoint's original spelling. Fun-Control extras
  (``ref_conv.*``, ``control_adapter.*``) are refused as unexpected keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

from . import check_keys
from .files import read_state_dict

__all__ = [
    "convert_transformer_state_dict",
    "expected_original_keys",
    "load_transformer_state_dict",
    "original_key_name",
    "transformer_state_dict_from_files",
]

COMPONENT = "transformer"
VOCAL_PREFIX = "vocal_projector."
WRAPPER_PREFIX = "model.diffusion_model."

# Inverse of diffusers' rename table for the keys our model has, applied in this order (model name -> original).
_INVERSE_RENAMES: tuple[tuple[str, str], ...] = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    ("norm2", "norm__placeholder"),
    ("norm3", "norm2"),
    ("norm__placeholder", "norm3"),
    (".attn2.", ".cross_attn."),
    (".attn1.", ".self_attn."),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    (".add_k_proj.", ".k_img."),
    (".add_v_proj.", ".v_img."),
    (".norm_added_k.", ".norm_k_img."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
)


def _strip_wrapper_prefix(key: str) -> str:
    return key[len(WRAPPER_PREFIX) :] if key.startswith(WRAPPER_PREFIX) else key


def convert_transformer_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original (Wan / StableAvatar) names -> ``StableAvatarTransformer3DModel`` names. Does not modify ``sd``.

    Raises ``ValueError`` if two original keys map onto the same model key.
    """
    base: dict[str, torch.Tensor] = {}
    vocal: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        key = _strip_wrapper_prefix(key)
        (vocal if key.startswith(VOCAL_PREFIX) else base)[key] = value
    converted = convert_wan_transformer_to_diffusers(base)  # pops from `base`, our private copy
    if len(converted) + len(vocal) != len(sd) or converted.keys() & vocal.keys():
        raise ValueError(f"{COMPONENT} checkpoint has keys that collide after conversion")
    converted.update(vocal)
    return converted


def original_key_name(model_key: str) -> str:
    """The Wan-original spelling of one of our model's keys (the inverse of ``convert_transformer_state_dict``)."""
    if model_key.startswith(VOCAL_PREFIX):
        return model_key
    if model_key == "scale_shift_table":
        return "head.modulation"
    if model_key.startswith("proj_out."):
        return "head.head." + model_key[len("proj_out.") :]
    key = model_key.replace("scale_shift_table", "modulation")
    for new, old in _INVERSE_RENAMES:
        key = key.replace(new, old)
    return key


def expected_original_keys(model: torch.nn.Module) -> set[str]:
    """The original key names a checkpoint must hold, exactly, to load into ``model``.

    Every inverted name is verified to convert back to its model key, so a rename the inverse table does not know
    about fails loudly here instead of producing wrong error messages.
    """
    model_keys = list(model.state_dict().keys())
    originals = {original_key_name(k): k for k in model_keys}
    roundtrip = convert_transformer_state_dict(dict.fromkeys(originals, None))  # model key -> None
    if len(originals) != len(model_keys) or roundtrip.keys() != set(model_keys):
        bad = sorted(set(model_keys) - roundtrip.keys())
        raise RuntimeError(f"{COMPONENT} key map cannot invert model keys: {bad[:8]}")
    return set(originals)


def load_transformer_state_dict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Strictly load an original-layout state dict into ``model``.

    Raises ``pipeline.keymaps.CheckpointKeyError`` naming the missing / unexpected keys in the checkpoint's own
    spelling (a ``model.diffusion_model.`` prefix is ignored). Tensors are copied into the existing parameters,
    so their dtype (e.g. bf16 with fp32-kept modules) is preserved; a model on the meta device is materialised with
    ``assign=True`` in the dtype of each meta parameter.
    """
    normalized = {_strip_wrapper_prefix(k): v for k, v in sd.items()}
    if len(normalized) != len(sd):
        raise ValueError(
            f"{COMPONENT} checkpoint holds keys both with and without the {WRAPPER_PREFIX!r} prefix"
        )
    check_keys(COMPONENT, expected_original_keys(model), normalized.keys())
    converted = convert_transformer_state_dict(normalized)
    model_sd = model.state_dict()
    # Cannot fail after the check above; belt and braces against a key-map bug.
    check_keys(COMPONENT, model_sd.keys(), converted.keys())
    assign = any(t.is_meta for t in model_sd.values())
    if assign:
        converted = {k: v.to(dtype=model_sd[k].dtype) for k, v in converted.items()}
    model.load_state_dict(converted, strict=True, assign=assign)


def transformer_state_dict_from_files(paths: Sequence[Path | str]) -> dict[str, torch.Tensor]:
    """Read and merge checkpoint files in order; later files override earlier keys.

    Each file goes through ``pipeline.keymaps.files.read_state_dict``: ``.safetensors``, torch pickles (wrapped
    training checkpoints included), ``*.index.json`` shard sets; ``module.``/``_orig_mod.`` prefixes removed.
    """
    merged: dict[str, torch.Tensor] = {}
    for path in map(Path, paths):
        merged.update(read_state_dict(path))
    return merged
