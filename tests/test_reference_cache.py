"""The reference-image cache (``pipeline.reference_cache``): an avatar reused across requests costs no VAE encode and
no CLIP forward and gives the conditioning a fresh encode gives; another image or another size is another entry;
the byte bound holds; and the shared byte-bounded LRU (``pipeline.host_cache``) accounts tuples of tensors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from pipeline.generator import GenerationParams, StableAvatarPipeline
from pipeline.host_cache import HostTensorCache, value_bytes
from pipeline.loading import load_models
from pipeline.presets import get_preset
from pipeline.reference_cache import reference_key
from pipeline.settings import PipelineSettings
from testing.media import EXAMPLE_IMAGE, synthetic_speech


@pytest.fixture(scope="module")
def models():
    return load_models(get_preset("tiny"), ["vae", "text_encoder", "image_encoder", "audio_encoder"], device="cpu")


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    return synthetic_speech(tmp_path_factory.mktemp("audio") / "speech.wav", 1.0)


def counted(models) -> dict[str, list[int]]:
    """Forwards of the VAE's encoder and of CLIP, counted by pre-hooks on the real modules."""
    calls: dict[str, list[int]] = {"vae": [], "clip": []}
    models.vae.encoder.register_forward_pre_hook(lambda *_: calls["vae"].append(1))
    models.image_encoder.register_forward_pre_hook(lambda *_: calls["clip"].append(1))
    return calls


def params(prompt: str = "a person talking", aspect_ratio: str = "1:1") -> GenerationParams:
    return GenerationParams(prompt=prompt, aspect_ratio=aspect_ratio, num_inference_steps=1, seed=1)


def test_a_repeated_image_runs_no_vae_encode_or_clip_and_conditions_as_a_fresh_encode(models, audio):
    cached = StableAvatarPipeline(models, PipelineSettings())
    calls = counted(models)
    notes: list[str] = []
    first = cached.prepare(EXAMPLE_IMAGE, audio, params())
    vae_calls, clip_calls = len(calls["vae"]), len(calls["clip"])
    assert vae_calls > 0 and clip_calls == 1
    second = cached.prepare(EXAMPLE_IMAGE, audio, params("another prompt"), progress=notes.append)
    assert (len(calls["vae"]), len(calls["clip"])) == (vae_calls, clip_calls)  # nothing ran for the image
    assert any(note.endswith("(reference cache hit)") for note in notes)
    stats = cached.reference_cache.stats
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 1)
    assert stats.bytes == value_bytes((second.conditioning.y, second.conditioning.clip_context))

    fresh = StableAvatarPipeline(models, PipelineSettings(reference_cache_bytes=0)).prepare(
        EXAMPLE_IMAGE, audio, params("another prompt"))
    for got in (first, second):
        assert torch.equal(got.conditioning.y, fresh.conditioning.y)
        assert torch.equal(got.conditioning.clip_context, fresh.conditioning.clip_context)


def test_another_size_or_image_is_another_entry_and_the_bound_holds(models, audio):
    pipeline = StableAvatarPipeline(models, PipelineSettings())
    square = pipeline.prepare(EXAMPLE_IMAGE, audio, params())
    wide = pipeline.prepare(EXAMPLE_IMAGE, audio, params(aspect_ratio="16:9"))
    assert square.conditioning.y.shape != wide.conditioning.y.shape
    with Image.open(EXAMPLE_IMAGE) as image:
        mirrored = image.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    stats = pipeline.reference_cache.stats
    assert (stats.misses, stats.hits, stats.entries) == (2, 0, 2)
    pipeline.prepare(mirrored, audio, params())
    assert (stats.misses, stats.hits, stats.entries) == (3, 0, 3)

    one_entry = value_bytes((square.conditioning.y, square.conditioning.clip_context))
    tight = StableAvatarPipeline(models, PipelineSettings(reference_cache_bytes=one_entry))
    tight.prepare(EXAMPLE_IMAGE, audio, params())
    tight.prepare(mirrored, audio, params())  # evicts the first
    tight.prepare(EXAMPLE_IMAGE, audio, params())
    tight_stats = tight.reference_cache.stats
    assert (tight_stats.misses, tight_stats.hits, tight_stats.evictions, tight_stats.entries) == (3, 0, 2, 1)
    assert tight_stats.bytes == one_entry

    off = StableAvatarPipeline(models, PipelineSettings(reference_cache_bytes=0))
    off.prepare(EXAMPLE_IMAGE, audio, params())
    off.prepare(EXAMPLE_IMAGE, audio, params())
    assert (off.reference_cache.stats.hits, off.reference_cache.stats.entries, off.reference_cache.stats.bytes) == (
        0, 0, 0)


def test_the_key_is_the_pixels_and_their_shape():
    image = torch.randint(0, 255, (8, 12, 3), dtype=torch.uint8).numpy()
    assert reference_key(image) == reference_key(image.copy())
    changed = image.copy()
    changed[0, 0, 0] ^= 1
    assert reference_key(changed) != reference_key(image)
    assert reference_key(image.reshape(12, 8, 3)) != reference_key(image)
    assert reference_key(image[:, ::-1]) == reference_key(image[:, ::-1].copy())  # a strided view hashes its pixels


def test_the_host_cache_accounts_tuples_and_evicts_the_least_recently_used():
    def entry(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(rows, 4), torch.zeros(rows, dtype=torch.bfloat16)

    size = value_bytes(entry(2))
    assert size == 2 * 4 * 4 + 2 * 2
    cache: HostTensorCache[tuple[torch.Tensor, ...]] = HostTensorCache(2 * size)
    cache.put("a", entry(2))
    cache.put("b", entry(2))
    assert cache.get("a") is not None  # "b" is now the least recently used
    cache.put("c", entry(2))
    assert "b" not in cache and "a" in cache and "c" in cache
    assert (cache.stats.entries, cache.stats.bytes, cache.stats.evictions) == (2, 2 * size, 1)
    cache.put("big", entry(100))  # larger than the whole bound: not kept, nothing evicted for it
    assert "big" not in cache and cache.stats.bytes == 2 * size
