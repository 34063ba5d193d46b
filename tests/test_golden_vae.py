"""Wan VAE on diffusers' AutoencoderKLWan against the upstream golden vectors, and the streaming decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.keymaps import CheckpointKeyError
from pipeline.keymaps.vae import load_vae_weights, original_vae_keys
from pipeline.models.vae import StreamingVaeDecoder, build_vae, encode_latents, frames_to_uint8
from pipeline.presets import TINY_VAE
from tests.helpers import assert_golden


@pytest.fixture(scope="module")
def state_dict(golden):
    return golden("vae").tensors("state_dict")


@pytest.fixture(scope="module")
def vae(state_dict):
    model = build_vae(**TINY_VAE)
    load_vae_weights(model, state_dict)
    return model


@pytest.fixture(scope="module")
def inputs(golden):
    return golden("vae").tensors("inputs")


@pytest.fixture(scope="module")
def outputs(golden):
    return golden("vae").tensors("outputs")


def one_shot_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """diffusers' own ``vae.decode`` (whole tensor at once) with upstream's un-normalisation; clamped."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        return vae.decode(latents / inv_std + mean).sample


def stream(vae, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    return torch.cat(list(StreamingVaeDecoder(vae).decode(latents, clamp=clamp)), dim=2)


def test_key_list_is_the_original_file(state_dict, vae):
    assert sorted(original_vae_keys(vae)) == sorted(state_dict)
    assert len(state_dict) == 194
    with torch.device("meta"):  # the real Wan2.1 config has the same names (no need to allocate 127M params)
        real = build_vae()
    assert len(original_vae_keys(real)) == 194


def test_encode_matches_golden(vae, inputs, outputs):
    with torch.no_grad():
        posterior = vae.encode(inputs["video"]).latent_dist
    assert_golden(posterior.mode(), outputs["mu_raw"])
    assert_golden(posterior.logvar, outputs["logvar"])
    latents = encode_latents(vae, inputs["video"])  # [1,16,3,2,2]
    assert_golden(latents, outputs["latent_mode"])
    # the upstream wrapper returns [normalised mu, raw logvar]
    assert_golden(torch.cat([latents, posterior.logvar], dim=1), outputs["encode_parameters"])


@pytest.mark.parametrize("name", ["mode", "z_rand"])
def test_streaming_decode_is_bit_exact_to_diffusers_and_matches_golden(vae, inputs, outputs, name):
    latents = outputs["latent_mode"] if name == "mode" else inputs["z_rand"]
    assert_golden(one_shot_decode(vae, latents), outputs[f"decode_of_{name}"])  # the reference is diffusers' decode
    assert_golden(stream(vae, latents, clamp=False), outputs[f"decode_of_{name}_unclamped"])
    want = one_shot_decode(vae, latents)  # diffusers, on this machine: streaming must equal it bit for bit
    want_raw = stream(vae, latents, clamp=False)
    assert torch.equal(stream(vae, latents), want)
    assert torch.equal(want_raw.clamp(-1, 1), want)
    decoder = StreamingVaeDecoder(vae)
    assert torch.equal(torch.cat([decoder.feed(latents[:, :, :1]), decoder.feed(latents[:, :, 1:])], 2), want)
    decoder.reset()
    pieces = [decoder.feed(latents[:, :, i : i + 1], clamp=False) for i in range(3)]
    assert [p.shape[2] for p in pieces] == [1, 4, 4]
    assert torch.equal(torch.cat(pieces, 2), want_raw)


def test_streaming_uneven_chunks_equal_one_shot(vae):
    latents = torch.randn(1, 16, 7, 2, 2, generator=torch.Generator().manual_seed(7))
    want = one_shot_decode(vae, latents)  # [1,3,25,16,16]
    frames = list(StreamingVaeDecoder(vae).decode(latents))
    assert [f.shape[2] for f in frames] == [1] + [4] * 6
    assert torch.equal(torch.cat(frames, 2), want)
    decoder = StreamingVaeDecoder(vae)
    for split in [(1, 3, 3), (2, 5), (7,)]:
        decoder.reset()
        bounds = np.cumsum((0, *split))
        out = [decoder.feed(latents[:, :, a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        assert [o.shape[2] for o in out] == [4 * n - (3 if i == 0 else 0) for i, n in enumerate(split)]
        assert torch.equal(torch.cat(out, 2), want), split
        assert decoder.latents_seen == 7


def test_stream_cache_is_not_the_modules(vae, inputs):
    """A ``vae.encode`` between two chunks (it calls ``clear_cache``) must not disturb a running stream."""
    latents = torch.randn(1, 16, 4, 2, 2, generator=torch.Generator().manual_seed(8))
    decoder = StreamingVaeDecoder(vae)
    first = decoder.feed(latents[:, :, :2])
    encode_latents(vae, inputs["video"])
    assert torch.equal(torch.cat([first, decoder.feed(latents[:, :, 2:])], 2), one_shot_decode(vae, latents))


def test_frames_to_uint8(outputs):
    frames = outputs["decode_of_mode"]  # [1,3,9,16,16] in [-1,1]
    pixels = frames_to_uint8(frames)
    assert pixels.dtype == np.uint8 and pixels.shape == (9, 16, 16, 3)
    want = ((frames[0].permute(1, 2, 3, 0) / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(pixels, want)
    edge = frames_to_uint8(torch.tensor([-1.5, -1.0, 0.0, 1.0, 1.5]).view(1, 1, 5, 1, 1).expand(1, 3, 5, 1, 1))
    assert edge[:, 0, 0, 0].tolist() == [0, 0, 128, 255, 255]


def test_missing_key_is_named(state_dict):
    sd = dict(state_dict)
    del sd["decoder.upsamples.3.time_conv.weight"]
    with pytest.raises(CheckpointKeyError, match=r"decoder\.upsamples\.3\.time_conv\.weight") as err:
        load_vae_weights(build_vae(**TINY_VAE), sd)
    assert err.value.missing == ["decoder.upsamples.3.time_conv.weight"] and not err.value.unexpected


def test_unexpected_key_is_named(state_dict):
    sd = {**state_dict, "model.encoder.conv1.weight": state_dict["encoder.conv1.weight"]}
    with pytest.raises(CheckpointKeyError, match=r"model\.encoder\.conv1\.weight") as err:
        load_vae_weights(build_vae(**TINY_VAE), sd)
    assert err.value.unexpected == ["model.encoder.conv1.weight"] and not err.value.missing


def test_chunking_never_changes_the_output_multithreaded(vae):
    """With several threads oneDNN picks width-dependent conv kernels; the stream must not depend on chunking."""
    latents = torch.randn(1, 16, 5, 8, 8, generator=torch.Generator().manual_seed(9))
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        want = torch.cat(list(StreamingVaeDecoder(vae).decode(latents)), dim=2)
        decoder = StreamingVaeDecoder(vae)
        got = torch.cat([decoder.feed(latents[:, :, :2]), decoder.feed(latents[:, :, 2:])], dim=2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got, want)
