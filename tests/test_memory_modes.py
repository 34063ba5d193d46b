"""Memory modes on the CPU with the tiny preset (``pipeline.memory``): the offload modes give the ``full`` output bit
for bit, fp8 weights stay within a documented tolerance, the diffusers/accelerate hooks are really in place, and a
mode that cannot work is refused when the models are loaded.

On a CPU-only machine the compute device and the host are the same, so moving a model "to the host" changes
nothing that a test could see. ``block_offload`` with ``offload_dir`` makes the offload observable: between calls
the offloaded parameters are placeholders and the weights live in files, so poisoning the placeholders with NaN
between calls must not change the output. The GPU side (peak memory per mode, speed) is the device kit's second
script (``bench/device/run_modes.sh``).
"""

from __future__ import annotations

import asyncio
import gc
import math

import pytest
import torch
from accelerate.hooks import CpuOffload
from diffusers.hooks import HookRegistry
from pydantic import ValidationError

from pipeline.generator import GenerationParams, PreparedRequest, StableAvatarPipeline
from pipeline.loading import ModelBundle, load_models
from pipeline.memory import FP8_STORAGE, MemoryModeError
from pipeline.models.devices import compute_device
from pipeline.models.vae import StreamingVaeDecoder
from pipeline.presets import get_preset
from pipeline.settings import MemorySettings, PipelineSettings
from testing.media import EXAMPLE_IMAGE, synthetic_speech

PARAMS = GenerationParams(prompt="a person talking", aspect_ratio="9:16", num_inference_steps=5, seed=7,
                          acceleration="high")
# fp8 e4m3 keeps 3 mantissa bits: each weight moves by up to 2**-4 of itself. Measured on the tiny preset (CPU,
# fp32 and gpu dtype policies): T5 output 6 %, one DiT prediction 2.4 %, final latents after 5 steps 1-2 %
# (relative L2). The bound leaves room for other seeds and weights.
FP8_RELATIVE_L2 = 0.10
STEP_CACHE = {"always_compute_first": 2, "guard_fitted_range": False}  # "high" then skips steps on the tiny preset


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def run(memory: MemorySettings, audio) -> tuple[ModelBundle, StableAvatarPipeline, PreparedRequest, torch.Tensor,
                                              torch.Tensor]:
    """prepare -> denoise (step cache on, so the timestep modulation is used) -> decoded frames."""
    models = load_models(get_preset("tiny"), device="cpu", memory=memory)
    pipeline = StableAvatarPipeline(models, PipelineSettings(memory=memory,
                                                             step_cache=STEP_CACHE))
    prepared = pipeline.prepare(EXAMPLE_IMAGE, audio, PARAMS)
    latents = asyncio.run(pipeline.denoise(prepared))
    frames = torch.cat(list(StreamingVaeDecoder(models.vae).decode(latents[:, :, :4].float())), dim=2)
    models.release()
    return models, pipeline, prepared, latents, frames


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    return synthetic_speech(tmp_path_factory.mktemp("audio") / "speech.wav", 4.0)


@pytest.fixture(scope="module")
def full(audio):
    return run(MemorySettings(), audio)


def conditioning_tensors(prepared: PreparedRequest) -> list[torch.Tensor]:
    c = prepared.conditioning
    return [c.text_positive, c.text_negative, c.clip_context, c.y, *c.audio_features]


@pytest.mark.parametrize("memory", [
    {"mode": "model_offload"},
    {"mode": "block_offload"},
    {"mode": "block_offload", "blocks_per_group": 2},
    {"mode": "model_offload", "text_encoder_device": "cpu"},
], ids=["model_offload", "block_offload", "block_offload-2-per-group", "model_offload-t5-on-cpu"])
def test_offload_modes_give_the_full_output_bit_for_bit(full, audio, memory):
    _, full_pipeline, full_prepared, full_latents, full_frames = full
    _, pipeline, prepared, latents, frames = run(MemorySettings(**memory), audio)
    for got, want in zip(conditioning_tensors(prepared), conditioning_tensors(full_prepared), strict=True):
        assert torch.equal(got, want)
    assert pipeline.step_cache_plan(prepared).compute == full_pipeline.step_cache_plan(full_prepared).compute
    assert False in pipeline.step_cache_plan(prepared).compute  # the step cache really skipped a step
    assert torch.equal(latents, full_latents)
    assert torch.equal(frames, full_frames)


def poison(*models: torch.nn.Module) -> None:
    with torch.no_grad():
        for model in models:
            for param in model.parameters():
                param.fill_(math.nan)


def test_block_offload_keeps_the_weights_in_the_offload_store_between_calls(full, audio, tmp_path):
    """With ``offload_dir`` the DiT's and T5's parameters are placeholders between calls: filling them with NaN
    leaves the output exactly that of ``full``, which it could not if the weights stayed in them."""
    _, _, full_prepared, full_latents, _ = full
    memory = MemorySettings(mode="block_offload", offload_dir=tmp_path / "offload")
    models = load_models(get_preset("tiny"), device="cpu", memory=memory)
    files = sorted(p.name for p in (tmp_path / "offload").glob("*/*.safetensors"))
    blocks = len(models.transformer.blocks) + len(models.text_encoder.encoder.block)
    assert len(files) == blocks + 3  # one per block, the DiT's and T5's top-level groups, T5's encoder group

    poison(models.transformer, models.text_encoder)
    pipeline = StableAvatarPipeline(models, PipelineSettings(memory=memory, step_cache=STEP_CACHE))
    prepared = pipeline.prepare(EXAMPLE_IMAGE, audio, PARAMS)
    assert torch.equal(prepared.conditioning.text_positive, full_prepared.conditioning.text_positive)
    poison(models.transformer, models.text_encoder)
    assert torch.equal(asyncio.run(pipeline.denoise(prepared)), full_latents)
    folders = list((tmp_path / "offload").iterdir())
    assert len(folders) == 2
    del models, pipeline
    gc.collect()
    assert not any(folder.exists() for folder in folders)  # a model's offload files go with it


def test_model_offload_chains_accelerate_hooks_in_the_order_of_use():
    models = load_models(get_preset("tiny"), device="cpu", memory=MemorySettings(mode="model_offload"))
    order = ["audio_encoder", "vae", "image_encoder", "text_encoder", "transformer"]
    hooks = models.placement.offload_hooks
    assert list(hooks) == order
    for previous, component in zip([None, *order], order, strict=False):
        hook = getattr(models, component)._hf_hook
        assert isinstance(hook, CpuOffload) and hook.execution_device == torch.device("cpu")
        assert hook.prev_module_hook is (hooks[previous] if previous else None)
        assert hooks[component].model is getattr(models, component)


def _group_offloaded(module: torch.nn.Module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return isinstance(registry, HookRegistry) and registry.get_hook("group_offloading") is not None


def test_block_offload_groups_the_blocks_of_the_dit_and_t5():
    models = load_models(get_preset("tiny"), device="cpu",
                         memory=MemorySettings(mode="block_offload", blocks_per_group=2))
    dit, t5 = models.transformer, models.text_encoder
    assert _group_offloaded(dit) and _group_offloaded(t5) and _group_offloaded(t5.encoder)
    assert all(_group_offloaded(block) for block in [*dit.blocks, *t5.encoder.block])
    group = dit.blocks[0]._diffusers_hook.get_hook("group_offloading").group
    assert group.modules == [dit.blocks[0], dit.blocks[1]]  # two blocks move together
    assert not _group_offloaded(dit.patch_embedding)  # block level: it moves with the DiT's top-level group
    assert models.placement.modes == {"audio_encoder": "model_offload", "vae": "model_offload",
                                      "image_encoder": "model_offload", "text_encoder": "block_offload",
                                      "transformer": "block_offload"}
    assert compute_device(dit) == torch.device("cpu")


@pytest.mark.parametrize("mode", ["fp8_weights", "block_offload+fp8_weights"])
def test_fp8_weights_store_float8_and_stay_within_tolerance(full, audio, mode):
    _, _, full_prepared, full_latents, _ = full
    models, pipeline, prepared, latents, _ = run(MemorySettings(mode=mode), audio)
    dit, t5 = models.transformer, models.text_encoder
    linear = dit.blocks[0].ffn.net[2]
    assert linear.weight.dtype == FP8_STORAGE  # between calls
    assert dit.patch_embedding.weight.dtype == torch.float32  # skipped: diffusers' skip list for Wan
    assert dit.scale_shift_table.dtype == torch.float32
    assert t5.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == FP8_STORAGE
    assert t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32  # its forward needs it
    assert t5.encoder.embed_tokens.weight.dtype == FP8_STORAGE
    assert models.vae.decoder.conv_in.weight.dtype == torch.float32  # fp8 is for the DiT and T5 only
    x = torch.randn(1, 5, linear.in_features)
    with torch.no_grad():  # computed in the compute dtype from the fp8 weights
        assert torch.equal(linear(x), torch.nn.functional.linear(x, linear.weight.float(), linear.bias.float()))
    text = relative_l2(prepared.conditioning.text_positive, full_prepared.conditioning.text_positive)
    final = relative_l2(latents, full_latents)
    assert 0 < text < FP8_RELATIVE_L2 and 0 < final < FP8_RELATIVE_L2
    assert torch.equal(prepared.conditioning.clip_context, full_prepared.conditioning.clip_context)


def test_fp8_weights_halve_the_stored_bytes_of_the_cast_layers():
    def stored_bytes(model: torch.nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in model.parameters())

    full = load_models(get_preset("tiny"), ["transformer"], device="cpu", dtype_policy="gpu")
    fp8 = load_models(get_preset("tiny"), ["transformer"], device="cpu", dtype_policy="gpu",
                      memory=MemorySettings(mode="fp8_weights"))
    cast = {n for n, p in fp8.transformer.named_parameters() if p.dtype == FP8_STORAGE}
    full_params = dict(full.transformer.named_parameters())
    assert cast and {full_params[n].dtype for n in cast} == {torch.bfloat16}  # the fp32 modules are not cast
    saved = sum(full_params[n].numel() for n in cast)  # 1 of 2 bytes each
    assert stored_bytes(full.transformer) - stored_bytes(fp8.transformer) == saved


@pytest.mark.parametrize("memory,message", [
    ({"mode": "turbo"}, "unknown memory mode 'turbo'"),
    ({"mode": "model_offload+block_offload"}, "exclude each other"),
    ({"mode": "full+fp8_weights"}, "combines with nothing"),
    ({"mode": "fp8_weights+fp8_weights"}, "names a mode twice"),
    ({"mode": "model_offload", "blocks_per_group": 2}, "only apply to block_offload"),
    ({"mode": "full", "offload_dir": "/tmp/x"}, "only apply to block_offload"),
    ({"mode": "block_offload", "use_stream": True, "blocks_per_group": 3}, "set blocks_per_group to 1"),
    ({"mode": 3}, "must be a string or a list"),
])
def test_a_mode_that_cannot_work_is_a_settings_error(memory, message):
    with pytest.raises(ValidationError, match=message) as caught:
        PipelineSettings(memory=memory)
    assert caught.value.errors()[0]["loc"][0] == "memory"


@pytest.mark.parametrize("memory", [{}, {"mode": "model_offload", "text_encoder_device": "cpu"},
                                    {"mode": "block_offload", "blocks_per_group": 2, "offload_dir": "/tmp/x"}])
def test_dumped_settings_read_back_as_they_were(memory):
    """The service's replicas re-read their pipeline settings from a dump (every field present): the block-offload
    options' defaults must not count as given under another mode."""
    settings = PipelineSettings(memory=memory)
    assert PipelineSettings.model_validate(settings.model_dump()) == settings
    assert PipelineSettings.model_validate_json(settings.model_dump_json()) == settings


def test_a_list_of_modes_is_the_joined_mode():
    assert MemorySettings(mode=["fp8_weights", "block_offload"]).mode == "block_offload+fp8_weights"
    settings = MemorySettings(mode="fp8_weights+model_offload")
    assert (settings.mode, settings.offload, settings.fp8_weights) == ("model_offload+fp8_weights", "model", True)
    assert (MemorySettings().offload, MemorySettings().fp8_weights) == ("none", False)


def test_streams_on_the_cpu_are_refused_before_any_model_is_built(monkeypatch):
    import pipeline.loading

    monkeypatch.setattr(pipeline.loading, "_build", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(MemoryModeError, match="device cpu has none"):
        load_models(get_preset("tiny"), device="cpu", memory=MemorySettings(mode="block_offload", use_stream=True))


def test_checkpoints_for_a_random_weights_preset_are_refused(tmp_path):
    with pytest.raises(ValueError, match="random weights and reads no checkpoints.*stableavatar-1.3b"):
        load_models(get_preset("tiny"), device="cpu", checkpoints=tmp_path)


def test_the_quoted_peaks_are_the_estimate_scripts():
    """``generate --help`` and the docs quote ``MEMORY_MODE_PEAKS_GB``; they are bench/memory_estimate.py's output
    as recorded in bench/results/memory_estimate.json (rerun the script after a model or mode change)."""
    import json

    from pipeline.settings import MEMORY_MODE_PEAKS_GB
    from testing.media import REPO_ROOT

    recorded = json.loads((REPO_ROOT / "bench" / "results" / "memory_estimate.json").read_text())
    assert recorded["preset"] == "stableavatar-1.3b-random"
    assert {mode: recorded["peaks"][mode]["peak_gb"] for mode in MEMORY_MODE_PEAKS_GB} == MEMORY_MODE_PEAKS_GB
    docs = (REPO_ROOT / "docs" / "gpu.md").read_text()
    for mode, gb in MEMORY_MODE_PEAKS_GB.items():
        assert f"| `{mode}` | {gb:.1f} |" in docs, mode


def test_the_estimate_script_runs_at_tiny_size(tmp_path):
    """Its arithmetic: each mode's peak is the largest stage, a stage is the resident weights plus its activations."""
    from bench.memory_estimate import STAGES, main, resident

    assert main(["--preset", "tiny", "--json", str(tmp_path / "m.json")]) == 0
    import json

    result = json.loads((tmp_path / "m.json").read_text())
    w, act = result["weights"]["bf16"], result["activations"]["bf16"]
    assert all(act[s] > 0 for s in STAGES) and result["activations"]["fp8_weights"]["text"] > act["text"]
    assert w["transformer"] == w["transformer_top_level"] + len_blocks() * w["transformer_block"]
    full = result["peaks"]["full"]
    assert full["peak_bytes"] == max(resident("full", s, w, False) + act[s] for s in STAGES)
    assert resident("model_offload", "dit", w, False) == w["transformer"]
    assert result["peaks"]["block_offload"]["peak_bytes"] < full["peak_bytes"]
    assert (tmp_path / "m.txt").read_text().startswith("Estimated peak GPU memory")


def len_blocks() -> int:
    from pipeline.presets import TINY_TRANSFORMER

    return TINY_TRANSFORMER["num_layers"]
