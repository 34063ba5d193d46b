"""CLIP ViT image tower on transformers' CLIPVisionModel against the upstream golden vectors (open-clip names)."""

from __future__ import annotations

import pytest
import torch

from pipeline.keymaps import CheckpointKeyError
from pipeline.keymaps.image_encoder import load_image_encoder_weights
from pipeline.models.image_encoder import build_image_encoder, clip_preprocess, encode_image_tokens
from pipeline.presets import TINY_IMAGE_ENCODER
from tests.helpers import GOLDEN_CROSS_CPU_ATOL, assert_golden


@pytest.fixture(scope="module")
def state_dict(golden):
    return golden("clip").tensors("state_dict")


@pytest.fixture(scope="module")
def model(state_dict):
    clip = build_image_encoder(**TINY_IMAGE_ENCODER)
    load_image_encoder_weights(clip, state_dict)
    return clip


@pytest.fixture(scope="module")
def image(golden):
    return golden("clip").tensors("inputs")["image"]  # [3,32,48] in [-1,1]


@pytest.fixture(scope="module")
def outputs(golden):
    return golden("clip").tensors("outputs")


def test_preprocessing_is_bit_exact(image, outputs):
    assert torch.equal(clip_preprocess(image), outputs["preprocessed_224"])


def test_tokens_match_golden(model, image, outputs):
    tokens = encode_image_tokens(model, image)  # [1,257,32]
    assert_golden(tokens, outputs["use_31_block_output"])
    with torch.no_grad():
        hidden = model(pixel_values=clip_preprocess(image), output_hidden_states=True).hidden_states
    assert_golden(hidden[-1], outputs["all_blocks_output"])
    # guards the off-by-one: block 31 of 32 is not the last block's output
    assert (outputs["use_31_block_output"] - outputs["all_blocks_output"]).abs().max() > 100 * GOLDEN_CROSS_CPU_ATOL


def _load(sd):
    clip = build_image_encoder(**TINY_IMAGE_ENCODER)
    load_image_encoder_weights(clip, sd)
    return clip


def test_text_tower_head_and_post_norm_are_optional(state_dict, model, image, outputs):
    visual_only = {k: v for k, v in state_dict.items()
                   if k.startswith("visual.") and k not in ("visual.head", "visual.post_norm.weight",
                                                             "visual.post_norm.bias")}
    clip = _load(visual_only)
    assert torch.equal(encode_image_tokens(clip, image), encode_image_tokens(model, image))
    assert torch.equal(clip.post_layernorm.weight, torch.ones(32))
    assert torch.equal(model.post_layernorm.bias, state_dict["visual.post_norm.bias"])


def test_missing_visual_key_is_named(state_dict):
    sd = {k: v for k, v in state_dict.items() if k != "visual.transformer.2.attn.to_qkv.bias"}
    with pytest.raises(CheckpointKeyError, match=r"visual\.transformer\.2\.attn\.to_qkv\.bias") as err:
        _load(sd)
    assert err.value.missing == ["visual.transformer.2.attn.to_qkv.bias"] and not err.value.unexpected


def test_unexpected_key_is_named(state_dict):
    sd = {**state_dict, "visual.proj": state_dict["visual.head"]}
    with pytest.raises(CheckpointKeyError, match=r"visual\.proj") as err:
        _load(sd)
    assert err.value.unexpected == ["visual.proj"] and not err.value.missing
