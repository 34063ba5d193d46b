"""Loading the official checkpoint layout, offline, through ``load_models``.

The layout is built from the golden tiny state dicts (original key names) in the official file names and formats:
a base ``diffusion_pytorch_model.safetensors`` without the audio modules, the StableAvatar ``.pt`` with the full
state dict, ``.pth`` files for VAE/T5/CLIP, a tokenizer folder and an HF wav2vec2 folder.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.generator import GenerationParams, StableAvatarPipeline
from pipeline.keymaps import CheckpointKeyError
from pipeline.loading import CheckpointLayout, CheckpointNotFoundError, load_models
from pipeline.presets import PRESETS
from testing.media import EXAMPLE_AUDIO, EXAMPLE_IMAGE

TINY_FROM_FILES = dataclasses.replace(PRESETS["tiny"], name="tiny-files", weights="checkpoint", tokenizer="umt5")
AUDIO_PREFIXES = ("vocal_projector.",)


def _save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(["a", "person", "is", "talking"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


def make_layout(root: Path, golden, transformer_sd: dict | None = None) -> CheckpointLayout:
    layout = CheckpointLayout(root, "square")
    layout.wan_dir.mkdir(parents=True)
    layout.transformer_audio.parent.mkdir(parents=True)
    full = transformer_sd if transformer_sd is not None else golden("transformer").tensors("state_dict")
    base = {k: v for k, v in full.items()
            if not k.startswith(AUDIO_PREFIXES) and ".k_vocal." not in k and ".v_vocal." not in k}
    save_file(base, layout.transformer_base)
    torch.save(full, layout.transformer_audio)
    torch.save(golden("vae").tensors("state_dict"), layout.vae)
    torch.save({k: v.bfloat16() for k, v in golden("text_encoder").tensors("state_dict").items()},
               layout.text_encoder)
    torch.save(golden("clip").tensors("state_dict"), layout.image_encoder)
    _save_tokenizer(layout.tokenizer)
    shutil.copytree(golden("pipeline").path / "wav2vec", layout.audio_encoder)
    return layout


@pytest.fixture(scope="module")
def layout(tmp_path_factory, golden):
    return make_layout(tmp_path_factory.mktemp("ckpt"), golden)


def test_official_layout_loads_and_reproduces_golden(layout, golden):
    bundle = load_models(TINY_FROM_FILES, checkpoints=layout.root)
    inputs, outputs = golden("transformer").tensors("inputs"), golden("transformer").tensors("outputs")
    with torch.no_grad():
        noise_pred = bundle.transformer(
            latents=inputs["x"], y=inputs["y"], timestep=inputs["timestep"],
            text_context=[inputs["context_neg"], inputs["context_neg"], inputs["context_pos"]],
            clip_fea=inputs["clip_fea"], audio_features=inputs["vocal_embeddings"],
            audio_rows=(False, True, True), seq_len=126, return_dict=False,
        )[0]
    torch.testing.assert_close(noise_pred, outputs["noise_pred"], atol=2e-5, rtol=0)
    assert all(p.dtype == torch.float32 for p in bundle.text_encoder.parameters())  # bf16 file, fp32 on CPU
    ids, mask = bundle.tokenizer(["a person is talking"])
    assert ids.shape == (1, 512) and ids[0, :5].tolist() == [3, 4, 5, 6, 1] and int(mask.sum()) == 5


def test_generation_from_checkpoint_files(layout, tmp_path):
    pipeline = StableAvatarPipeline(load_models(TINY_FROM_FILES, checkpoints=layout.root))
    params = GenerationParams(prompt="a person is talking", num_inference_steps=1, seed=1, aspect_ratio="1:1")
    prepared = pipeline.prepare(EXAMPLE_IMAGE, EXAMPLE_AUDIO, params)
    latents = asyncio.run(pipeline.denoise(prepared))
    result = pipeline.finish(prepared, latents, tmp_path / "out.mp4")
    assert result.frames == prepared.plan.output_frames and result.file_size > 0


@pytest.mark.parametrize("change,named", [
    ("drop", "blocks.1.cross_attn.k_vocal.weight"),
    ("drop", "vocal_projector.blocks.0.ffn.2.bias"),
    ("extra", "blocks.0.cross_attn.extra_gate.weight"),
])
def test_transformer_checkpoint_key_mismatch_is_named(tmp_path, golden, change, named):
    sd = dict(golden("transformer").tensors("state_dict"))
    if change == "drop":
        del sd[named]
    else:
        sd[named] = torch.zeros(4)
    layout = make_layout(tmp_path, golden, sd)
    with pytest.raises(CheckpointKeyError, match=named.replace(".", r"\.")):
        load_models(TINY_FROM_FILES, components=["transformer"], checkpoints=layout.root)


def test_missing_files_are_named(tmp_path, layout):
    broken = tmp_path / "broken"
    shutil.copytree(layout.root, broken)
    (CheckpointLayout(broken).vae).unlink()
    with pytest.raises(CheckpointNotFoundError, match="Wan2.1_VAE.pth"):
        load_models(TINY_FROM_FILES, components=["vae"], checkpoints=broken)
    with pytest.raises(CheckpointNotFoundError, match="--checkpoints"):
        load_models(TINY_FROM_FILES, components=["vae"], checkpoints=None)
