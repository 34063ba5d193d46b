"""UMT5 encoder on transformers' UMT5EncoderModel against the upstream golden vectors (Wan T5 key names)."""

from __future__ import annotations

import pytest
import torch

from pipeline.keymaps import CheckpointKeyError
from pipeline.keymaps.text_encoder import load_text_encoder_weights
from pipeline.models.text_encoder import build_text_encoder, encode_prompts
from pipeline.presets import TINY_TEXT_ENCODER

ATOL = 1e-5  # measured 2.9e-6: op-order noise (feasibility §3)


@pytest.fixture(scope="module")
def state_dict(golden):
    return golden("text_encoder").tensors("state_dict")


@pytest.fixture(scope="module")
def model(state_dict):
    t5 = build_text_encoder(**TINY_TEXT_ENCODER)
    load_text_encoder_weights(t5, state_dict)
    return t5


def test_outputs_match(golden, model):
    inputs, outputs = golden("text_encoder").tensors("inputs"), golden("text_encoder").tensors("outputs")
    with torch.no_grad():
        hidden = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    torch.testing.assert_close(hidden, outputs["last_hidden_state"], atol=ATOL, rtol=0)
    positive, negative = encode_prompts(model, inputs["input_ids"], inputs["attention_mask"])
    assert positive.shape == (11, 32) and negative.shape == (23, 32)
    torch.testing.assert_close(positive, outputs["prompt_embeds_pos"], atol=ATOL, rtol=0)
    torch.testing.assert_close(negative, outputs["prompt_embeds_neg"], atol=ATOL, rtol=0)


def test_embedding_is_tied(state_dict, model):
    assert model.shared.weight is model.encoder.embed_tokens.weight
    assert torch.equal(model.shared.weight, state_dict["token_embedding.weight"])


def test_meta_device_build_with_assign(golden, state_dict, model):
    """The 6.7B encoder can be built on ``meta`` and take the checkpoint tensors without an fp32 copy first."""
    with torch.device("meta"):
        lazy = build_text_encoder(**TINY_TEXT_ENCODER)
    load_text_encoder_weights(lazy, state_dict, assign=True)
    assert lazy.shared.weight is lazy.encoder.embed_tokens.weight
    inputs = golden("text_encoder").tensors("inputs")
    got = encode_prompts(lazy, inputs["input_ids"], inputs["attention_mask"])
    want = encode_prompts(model, inputs["input_ids"], inputs["attention_mask"])
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_missing_key_is_named(state_dict):
    sd = {k: v for k, v in state_dict.items() if k != "blocks.1.pos_embedding.embedding.weight"}
    with pytest.raises(CheckpointKeyError, match=r"blocks\.1\.pos_embedding\.embedding\.weight") as err:
        load_text_encoder_weights(build_text_encoder(**TINY_TEXT_ENCODER), sd)
    assert err.value.missing == ["blocks.1.pos_embedding.embedding.weight"] and not err.value.unexpected


def test_unexpected_key_is_named(state_dict):
    sd = {**state_dict, "blocks.2.norm1.weight": state_dict["blocks.1.norm1.weight"]}
    with pytest.raises(CheckpointKeyError, match=r"blocks\.2\.norm1\.weight") as err:
        load_text_encoder_weights(build_text_encoder(**TINY_TEXT_ENCODER), sd)
    assert err.value.unexpected == ["blocks.2.norm1.weight"] and not err.value.missing
