"""``y`` and the CLIP context built from the reference image, against the upstream golden vectors."""

from __future__ import annotations

import pytest
import torch

from pipeline.conditioning import build_clip_context, build_y, reference_video
from pipeline.keymaps.image_encoder import load_image_encoder_weights
from pipeline.keymaps.vae import load_vae_weights
from pipeline.models.image_encoder import build_image_encoder
from pipeline.models.vae import build_vae
from pipeline.presets import TINY_IMAGE_ENCODER, TINY_VAE
from tests.helpers import assert_golden


@pytest.fixture(scope="module")
def vae(golden):
    model = build_vae(**TINY_VAE)
    load_vae_weights(model, golden("vae").tensors("state_dict"))
    return model


@pytest.fixture(scope="module")
def clip(golden):
    model = build_image_encoder(**TINY_IMAGE_ENCODER)
    load_image_encoder_weights(model, golden("clip").tensors("state_dict"))
    return model


@pytest.fixture(scope="module")
def inputs(golden):
    return golden("conditioning").tensors("inputs")


def test_reference_video(inputs):
    video = reference_video(inputs["ref_image_uint8"].numpy())  # [1,3,81,32,48]
    assert video.shape == (1, 3, 81, 32, 48)
    assert torch.equal(video[:, :, :1], inputs["ref_image"])
    assert not video[:, :, 1:].any()


def test_y_and_clip_context_match_golden(golden, vae, clip, inputs):
    outputs = golden("conditioning").tensors("outputs")
    image_u8 = inputs["ref_image_uint8"].numpy()
    y = build_y(vae, image_u8)  # [1,20,21,4,6]
    assert torch.equal(y[:, :4], outputs["mask"])  # built, not computed: exact on any CPU
    assert_golden(y[:, 4:], outputs["ref_latents"])
    assert_golden(y.repeat(3, 1, 1, 1, 1), outputs["y"])
    assert_golden(build_clip_context(clip, image_u8).repeat(3, 1, 1), outputs["clip_fea"])


def test_end_to_end_run_first_call(golden, vae, clip):
    """The same construction for the 16x32 image of the end-to-end ``pipeline/`` run."""
    run = golden("pipeline").tensors("run")
    image_u8 = run["ref_image_uint8"].numpy()
    assert_golden(build_y(vae, image_u8), run["first_call/y"])
    assert_golden(build_clip_context(clip, image_u8), run["first_call/clip_fea"])
