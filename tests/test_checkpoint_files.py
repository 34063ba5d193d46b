"""Checkpoint files as training and the hub produce them load to exactly the tensors of the plain layout.

The tiny transformer's official-named state dict (golden/transformer) is saved in each format: a ``.pt`` wrapped
like a training checkpoint (``state_dict``/``module``/``model`` beside ``epoch`` and an optimizer) with DDP's
``module.`` and torch.compile's ``_orig_mod.`` prefixes, a base DiT as ``.bin`` or as hub shards with an index.
Loading each through ``load_models`` must give the same parameters, bit for bit, as the plain layout; broken
variants must fail naming the file or key at fault.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.keymaps import CheckpointKeyError
from pipeline.keymaps.files import CheckpointFileError, read_state_dict
from pipeline.loading import CheckpointLayout, CheckpointNotFoundError, load_models
from pipeline.presets import PRESETS

TINY_FROM_FILES = dataclasses.replace(PRESETS["tiny"], name="tiny-files", weights="checkpoint", tokenizer="umt5")
BASE_STEM = "diffusion_pytorch_model"


def is_audio_key(key: str) -> bool:
    return key.startswith("vocal_projector.") or ".k_vocal." in key or ".v_vocal." in key


def prefixed(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def optimizer_state(sd: dict[str, torch.Tensor]) -> dict:
    """What ``optimizer.state_dict()`` holds (plain containers and tensors, as weights_only allows)."""
    first = next(iter(sd.values()))
    return {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(first)}},
            "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.999), "params": [0]}]}


@pytest.fixture(scope="module")
def full(golden) -> dict[str, torch.Tensor]:
    return golden("transformer").tensors("state_dict")


@pytest.fixture(scope="module")
def base(full) -> dict[str, torch.Tensor]:
    return {k: v for k, v in full.items() if not is_audio_key(k)}


@pytest.fixture(scope="module")
def audio(full) -> dict[str, torch.Tensor]:
    return {k: v for k, v in full.items() if is_audio_key(k)}


def save_shards(sd: dict[str, torch.Tensor], folder: Path, suffix: str, n: int = 3) -> Path:
    """The hub layout: ``diffusion_pytorch_model-0000i-of-0000n.<suffix>`` plus ``<name>.<suffix>.index.json``."""
    keys = sorted(sd)
    weight_map = {}
    for i in range(n):
        name = f"{BASE_STEM}-{i + 1:05d}-of-{n:05d}.{suffix}"
        part = {k: sd[k] for k in keys[i::n]}
        if suffix == "safetensors":
            save_file(part, folder / name)
        else:
            torch.save(part, folder / name)
        weight_map |= dict.fromkeys(part, name)
    index = folder / f"{BASE_STEM}.{suffix}.index.json"
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return index


def write_layout(root: Path, base_writer: Callable[[Path], None], pt_object: object) -> CheckpointLayout:
    layout = CheckpointLayout(root, "square")
    layout.wan_dir.mkdir(parents=True)
    layout.transformer_audio.parent.mkdir(parents=True)
    base_writer(layout.wan_dir)
    torch.save(pt_object, layout.transformer_audio)
    return layout


def load_transformer(layout: CheckpointLayout) -> dict[str, torch.Tensor]:
    return load_models(TINY_FROM_FILES, components=["transformer"], checkpoints=layout.root).transformer.state_dict()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base, full) -> dict[str, torch.Tensor]:
    """The plain layout: base safetensors + a bare full state dict in the .pt."""
    root = tmp_path_factory.mktemp("plain")
    layout = write_layout(root, lambda d: save_file(base, d / f"{BASE_STEM}.safetensors"), full)
    return load_transformer(layout)


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


# The .pt as training writes it. Each variant holds the full state dict (as StableAvatar's .pt does).
PT_VARIANTS: dict[str, Callable[[dict], object]] = {
    "state_dict wrapper + epoch/optimizer": lambda sd: {"state_dict": sd, "epoch": 3, "global_step": 1200,
                                                        "optimizer": optimizer_state(sd)},
    "DeepSpeed module wrapper, module. prefix": lambda sd: {"module": prefixed(sd, "module."), "buffer_names": [],
                                                            "optimizer": None, "global_steps": 1200},
    "model wrapper, torch.compile _orig_mod. prefix": lambda sd: {"model": prefixed(sd, "_orig_mod."), "epoch": 1},
    "bare, DDP around compiled (module._orig_mod.)": lambda sd: prefixed(sd, "module._orig_mod."),
    "bare, compiled around DDP (_orig_mod.module.)": lambda sd: prefixed(sd, "_orig_mod.module."),
    "nested model/state_dict wrappers": lambda sd: {"model": {"state_dict": prefixed(sd, "module.")}, "epoch": 2},
}


@pytest.mark.parametrize("variant", list(PT_VARIANTS))
def test_training_checkpoint_pt_loads_the_same_tensors(tmp_path, base, full, reference, variant):
    layout = write_layout(tmp_path, lambda d: save_file(base, d / f"{BASE_STEM}.safetensors"),
                          PT_VARIANTS[variant](full))
    assert_same_tensors(load_transformer(layout), reference)


# The base DiT as the hub may ship it. The .pt then holds only the audio modules, so every base weight in the
# result must have come through the base files (a full .pt would hide a base that was not read at all).
BASE_VARIANTS: dict[str, Callable[[dict, Path], None]] = {
    "single .bin": lambda sd, d: torch.save(sd, d / f"{BASE_STEM}.bin"),
    "sharded safetensors + index": lambda sd, d: save_shards(sd, d, "safetensors"),
    "sharded .bin + index": lambda sd, d: save_shards(sd, d, "bin"),
}


@pytest.mark.parametrize("variant", list(BASE_VARIANTS))
def test_hub_base_formats_load_the_same_tensors(tmp_path, base, audio, reference, variant):
    layout = write_layout(tmp_path, lambda d: BASE_VARIANTS[variant](base, d), {"state_dict": audio, "epoch": 0})
    assert_same_tensors(load_transformer(layout), reference)


def test_single_safetensors_is_preferred_over_shards(tmp_path, base, audio, reference):
    """diffusers' order: one safetensors file wins over an index (here the shards hold zeros)."""
    def both(d: Path) -> None:
        save_file(base, d / f"{BASE_STEM}.safetensors")
        save_shards({k: torch.zeros_like(v) for k, v in base.items()}, d, "safetensors")

    layout = write_layout(tmp_path, both, audio)
    assert layout.transformer_base_files() == [layout.wan_dir / f"{BASE_STEM}.safetensors"]
    assert_same_tensors(load_transformer(layout), reference)


def test_missing_shard_is_named(tmp_path, base, audio):
    layout = write_layout(tmp_path, lambda d: save_shards(base, d, "safetensors"), audio)
    (layout.wan_dir / f"{BASE_STEM}-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model-00002-of-00003\.safetensors"):
        load_transformer(layout)


def test_key_the_index_names_but_no_shard_holds_is_named(tmp_path, base, audio):
    layout = write_layout(tmp_path, lambda d: save_shards(base, d, "safetensors"), audio)
    index_path = layout.wan_dir / f"{BASE_STEM}.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["blocks.0.self_attn.q.extra"] = f"{BASE_STEM}-00001-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointFileError, match=r"blocks\.0\.self_attn\.q\.extra") as err:
        load_transformer(layout)
    assert f"{BASE_STEM}-00001-of-00003.safetensors" in str(err.value)


def test_key_a_shard_holds_but_the_index_omits_is_named(tmp_path, base, audio):
    layout = write_layout(tmp_path, lambda d: save_shards(base, d, "safetensors"), audio)
    index_path = layout.wan_dir / f"{BASE_STEM}.safetensors.index.json"
    index = json.loads(index_path.read_text())
    dropped = sorted(index["weight_map"])[0]
    del index["weight_map"][dropped]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointFileError, match=dropped.replace(".", r"\.")):
        load_transformer(layout)


def test_no_base_weights_names_the_expected_files(tmp_path, audio):
    layout = write_layout(tmp_path, lambda d: None, audio)
    with pytest.raises(CheckpointNotFoundError) as err:
        load_transformer(layout)
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                 "diffusion_pytorch_model.bin"):
        assert name in str(err.value)


@pytest.mark.parametrize("change", ["drop", "extra"])
def test_key_mismatch_after_normalisation_is_named(tmp_path, base, full, change):
    """A prefixed, wrapped checkpoint that lacks a key (or has one too many) names it without the prefixes."""
    name = "blocks.1.cross_attn.k_vocal.weight" if change == "drop" else "blocks.0.cross_attn.extra_gate.weight"
    sd = {k: v for k, v in full.items() if k != name}
    if change == "extra":
        sd[name] = torch.zeros(4)
    layout = write_layout(tmp_path, lambda d: save_shards(base, d, "safetensors"),
                          {"module": prefixed(sd, "module._orig_mod."), "epoch": 1})
    with pytest.raises(CheckpointKeyError) as err:
        load_transformer(layout)
    assert (err.value.missing if change == "drop" else err.value.unexpected) == [name]
    assert name in str(err.value) and "module." not in str(err.value)


def test_prefix_collision_names_both_keys(tmp_path, full):
    path = tmp_path / "collide.pt"
    key = "head.modulation"
    torch.save({**full, f"module.{key}": full[key]}, path)
    with pytest.raises(CheckpointFileError) as err:
        read_state_dict(path)
    assert f"'module.{key}'" in str(err.value) and f"'{key}'" in str(err.value)


def test_two_wrappers_holding_weights_are_refused(tmp_path, full):
    path = tmp_path / "ambiguous.pt"
    torch.save({"state_dict": full, "model": full}, path)
    with pytest.raises(CheckpointFileError, match=r"ambiguous\.pt: several entries could hold the weights"):
        read_state_dict(path)


def test_pickled_objects_are_refused_naming_the_file(tmp_path, full):
    path = tmp_path / "with-args.pt"
    torch.save({"state_dict": full, "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(CheckpointFileError, match=r"with-args\.pt: holds objects other than tensors"):
        read_state_dict(path)


def test_training_wrappers_are_removed_for_every_component(tmp_path, golden):
    """The other ``.pth`` files go through the same reader: a DDP-saved VAE loads the same weights."""
    vae_sd = golden("vae").tensors("state_dict")
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save({"module": prefixed(vae_sd, "module."), "epoch": 7}, path)
    got = read_state_dict(path)
    assert_same_tensors(got, vae_sd)


@pytest.mark.parametrize("policy", ["fp32", "gpu"])
def test_mixed_dtype_file_is_cast_whole(tmp_path, golden, policy):
    """A ``.pth`` whose tensors have mixed dtypes (here bf16 but the VAE's first conv) is cast to the component's
    dtype entirely, not judged by its first parameter."""
    sd = {k: v if k == "encoder.conv1.weight" else v.bfloat16()
          for k, v in golden("vae").tensors("state_dict").items()}
    layout = CheckpointLayout(tmp_path)
    layout.wan_dir.mkdir(parents=True)
    torch.save(sd, layout.vae)
    vae = load_models(TINY_FROM_FILES, components=["vae"], checkpoints=tmp_path, dtype_policy=policy).vae
    assert {p.dtype for p in vae.parameters()} == {torch.float32}  # the VAE is fp32 under both policies
    assert torch.equal(vae.encoder.conv_in.weight, sd["encoder.conv1.weight"])
