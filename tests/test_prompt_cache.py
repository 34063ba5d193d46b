"""The prompt-embedding cache (``pipeline.prompt_cache``): a cached prompt costs no T5 forward, the byte bound evicts
least recently used entries, and the byte accounting matches the tensors held."""

from __future__ import annotations

import pytest
import torch

from pipeline.generator import GenerationParams, StableAvatarPipeline
from pipeline.host_cache import tensor_bytes
from pipeline.loading import load_models
from pipeline.presets import get_preset
from pipeline.prompt_cache import PromptEmbeddingCache
from pipeline.settings import PipelineSettings
from pipeline.text import PromptEncoder
from testing.media import EXAMPLE_IMAGE, synthetic_speech


@pytest.fixture
def models():
    return load_models(get_preset("tiny"), ["text_encoder"], device="cpu")


def counted_encoder(models, cache: PromptEmbeddingCache | None) -> tuple[PromptEncoder, list[int]]:
    """A prompt encoder whose T5 forwards are counted (a forward pre-hook on the real T5)."""
    forwards: list[int] = []
    models.text_encoder.register_forward_pre_hook(lambda *_: forwards.append(1))
    return PromptEncoder(models.tokenizer, models.text_encoder, cache=cache), forwards


def embedding(rows: int, dtype=torch.float32) -> torch.Tensor:
    return torch.arange(rows * 8, dtype=dtype).reshape(rows, 8)


def test_a_cached_prompt_runs_no_t5_forward(models):
    cache = PromptEmbeddingCache(1 << 20)
    encoder, forwards = counted_encoder(models, cache)
    first = encoder.encode("a person talking")
    assert len(forwards) == 1 and first.device == torch.device("cpu")
    again = encoder.encode("a person talking")
    assert len(forwards) == 1 and again is first
    assert torch.equal(first, encoder.run_text_encoder("a person talking").cpu())  # what T5 computes
    assert len(forwards) == 2  # run_text_encoder never reads the cache
    encoder.encode("  a   person talking ")  # the same text after the tokenizer's whitespace cleaning
    encoder.encode("someone else")
    assert len(forwards) == 3
    stats = cache.stats.as_dict()
    assert stats == {"hits": 2, "misses": 2, "evictions": 0, "entries": 2,
                     "bytes": tensor_bytes(first) + tensor_bytes(encoder.encode("someone else"))}


def test_no_cache_runs_t5_for_every_prompt(models):
    encoder, forwards = counted_encoder(models, None)
    encoder.encode("x")
    encoder.encode("x")
    assert len(forwards) == 2


def test_the_byte_bound_evicts_the_least_recently_used():
    size = tensor_bytes(embedding(4))  # 128 bytes
    cache = PromptEmbeddingCache(3 * size)
    for name in "abc":
        cache.put(name, embedding(4))
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", embedding(4))
    assert "b" not in cache and {"a", "c", "d"} == {k for k in "abcd" if k in cache}
    assert (cache.stats.evictions, cache.stats.bytes, cache.stats.entries) == (1, 3 * size, 3)
    cache.put("e", embedding(8))  # twice the size: two entries go
    assert [k for k in "acde" if k in cache] == ["d", "e"] and cache.stats.evictions == 3
    assert cache.stats.bytes == 3 * size == sum(tensor_bytes(cache.get(k)) for k in "de")


def test_byte_accounting_follows_replacement_dtype_and_oversize_entries():
    cache = PromptEmbeddingCache(1000)
    cache.put("p", embedding(4))  # fp32: 128 bytes
    cache.put("p", embedding(4, torch.bfloat16))  # replaced: 64 bytes
    assert (cache.stats.bytes, cache.stats.entries, cache.stats.evictions) == (64, 1, 0)
    kept = cache.put("huge", embedding(200))  # 6400 bytes > the bound: returned, not kept
    assert torch.equal(kept, embedding(200)) and "huge" not in cache and cache.stats.bytes == 64
    cache.put("p", embedding(200))  # an existing key replaced by an oversize tensor leaves
    assert len(cache) == 0 and cache.stats.bytes == 0
    cache.put("q", embedding(1))
    cache.clear()
    assert (len(cache), cache.stats.bytes, cache.stats.entries) == (0, 0, 0)
    with pytest.raises(ValueError, match="max_bytes"):
        PromptEmbeddingCache(-1)


def test_zero_bytes_keeps_nothing():
    cache = PromptEmbeddingCache(0)
    cache.put("a", embedding(1))
    assert cache.get("a") is None and cache.stats.misses == 1 and cache.stats.bytes == 0


def test_the_pipeline_encodes_a_repeated_prompt_once(tmp_path):
    """Two requests with one prompt: one T5 forward for it (plus one for the negative prompt, once per process),
    the same conditioning, and the counters the metrics read."""
    models = load_models(get_preset("tiny"), device="cpu")
    forwards: list[int] = []
    models.text_encoder.register_forward_pre_hook(lambda *_: forwards.append(1))
    pipeline = StableAvatarPipeline(models, PipelineSettings(prompt_cache_bytes=1 << 20))
    audio = synthetic_speech(tmp_path / "speech.wav", 1.0)
    params = GenerationParams(prompt="a person talking", num_inference_steps=1, seed=1)
    first = pipeline.prepare(EXAMPLE_IMAGE, audio, params)
    second = pipeline.prepare(EXAMPLE_IMAGE, audio, params)
    assert len(forwards) == 2  # the prompt and the negative prompt, each once
    assert torch.equal(first.conditioning.text_positive, second.conditioning.text_positive)
    assert (pipeline.prompt_cache.stats.hits, pipeline.prompt_cache.stats.misses) == (1, 1)
    off = StableAvatarPipeline(models, PipelineSettings(prompt_cache_bytes=0))
    off.prepare(EXAMPLE_IMAGE, audio, params)
    off.prepare(EXAMPLE_IMAGE, audio, params)
    assert len(forwards) == 5  # the negative once more (a new pipeline), then the prompt twice
