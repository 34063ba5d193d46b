"""Builds the model components of a preset: random weights from a fixed seed, or the official checkpoints.

Components load independently (the Ray deployments each need a different subset). Every checkpoint goes through
an explicit key map that refuses missing or unexpected keys. Dtypes follow a policy: ``gpu`` runs the DiT and T5 in
bf16 and the VAE, CLIP and wav2vec in fp32 (as upstream), with a bf16 sampling state; ``fp32`` runs everything in
fp32; ``auto`` (the default) is ``gpu`` on an accelerator and ``fp32`` on the CPU. Asking for ``gpu`` on the CPU runs
the exact dtype path of a GPU deployment, so tests catch dtype mistakes without a GPU.

A memory mode (``pipeline.memory``) decides where each component is built (host memory when it is offloaded) and
hooks it after loading; the dtypes are always those of the target device.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from pipeline.presets import ModelPreset, TransformerVariant
from pipeline.settings import MemorySettings

log = logging.getLogger(__name__)

Component = Literal["transformer", "vae", "text_encoder", "image_encoder", "audio_encoder"]
DtypePolicy = Literal["auto", "gpu", "fp32"]
LOW_PRECISION_COMPONENTS: frozenset[str] = frozenset({"transformer", "text_encoder"})  # bf16 under the gpu policy
ALL_COMPONENTS: tuple[Component, ...] = ("transformer", "vae", "text_encoder", "image_encoder", "audio_encoder")
SEED_OFFSETS: dict[str, int] = {name: i for i, name in enumerate(ALL_COMPONENTS)}


class CheckpointNotFoundError(FileNotFoundError):
    """A file of the official layout is missing; names the file and how to get it."""


@dataclass(frozen=True)
class CheckpointLayout:
    """The official directory layout (as in the ``FrancisRing/StableAvatar`` download)."""

    root: Path
    variant: TransformerVariant = "square"

    @property
    def wan_dir(self) -> Path:
        return self.root / "Wan2.1-Fun-V1.1-1.3B-InP"

    @property
    def transformer_base(self) -> Path:
        """The single-file base DiT as the StableAvatar download ships it (see ``transformer_base_files``)."""
        return self.wan_dir / "diffusion_pytorch_model.safetensors"

    @property
    def transformer_base_candidates(self) -> tuple[Path, ...]:
        """The forms the base DiT takes, in diffusers' order of preference: safetensors (one file, or hub shards
        with an index), then torch ``.bin`` (one file, or shards with an index)."""
        stem = self.wan_dir / "diffusion_pytorch_model"
        return tuple(Path(f"{stem}{suffix}") for suffix in
                     (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json"))

    def transformer_base_files(self) -> list[Path]:
        """The base DiT weights to read: the first candidate that exists (an index stands for its shards)."""
        for path in self.transformer_base_candidates:
            if path.is_file():
                return [path]
        raise CheckpointNotFoundError(
            f"base transformer weights not found in {self.wan_dir}: expected one of "
            + ", ".join(p.name for p in self.transformer_base_candidates)
            + " (get the official layout with `stable-avatar download-weights --dir DIR`)")

    @property
    def transformer_audio(self) -> Path:
        return self.root / "StableAvatar-1.3B" / f"transformer3d-{self.variant}.pt"

    @property
    def vae(self) -> Path:
        return self.wan_dir / "Wan2.1_VAE.pth"

    @property
    def text_encoder(self) -> Path:
        return self.wan_dir / "models_t5_umt5-xxl-enc-bf16.pth"

    @property
    def tokenizer(self) -> Path:
        return self.wan_dir / "google" / "umt5-xxl"

    @property
    def image_encoder(self) -> Path:
        return self.wan_dir / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"

    @property
    def audio_encoder(self) -> Path:
        return self.root / "wav2vec2-base-960h"

    def require(self, *paths: Path) -> None:
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise CheckpointNotFoundError(
                "checkpoint files not found: " + ", ".join(str(p) for p in missing)
                + f" (expected the official layout under {self.root}; "
                "get it with `stable-avatar download-weights --dir DIR`)"
            )


@dataclass
class ModelBundle:
    """The loaded components (``None`` for those not asked for) and the dtypes the pipeline must use."""

    preset: ModelPreset
    device: torch.device
    state_dtype: torch.dtype  # dtype of the sampling state (latents, CFG arithmetic)
    transformer: Any = None
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    image_encoder: Any = None
    audio_encoder: Any = None
    feature_extractor: Any = None
    load_seconds: dict[str, float] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # each component's compute dtype
    placement: Any = None  # pipeline.memory.MemoryPlacement: the memory mode applied

    def release(self) -> None:
        """End of a stage: models offloaded whole go back to host memory (a no-op when nothing is offloaded)."""
        if self.placement is not None:
            self.placement.release()


def resolve_dtype_policy(policy: DtypePolicy, device: torch.device) -> Literal["gpu", "fp32"]:
    if policy not in ("auto", "gpu", "fp32"):
        raise ValueError(f"unknown dtype policy {policy!r}; choose auto, gpu or fp32")
    if policy == "auto":
        return "fp32" if torch.device(device).type == "cpu" else "gpu"
    return policy


def component_dtype(component: Component, device: torch.device, policy: DtypePolicy = "auto") -> torch.dtype:
    """bf16 for the DiT and T5 under the gpu policy (as upstream runs them), fp32 for everything else."""
    if resolve_dtype_policy(policy, device) == "fp32":
        return torch.float32
    return torch.bfloat16 if component in LOW_PRECISION_COMPONENTS else torch.float32


def state_dtype(device: torch.device, policy: DtypePolicy = "auto") -> torch.dtype:
    """Dtype of the sampling state (noise, latents, CFG arithmetic): bf16 under the gpu policy, as upstream."""
    return torch.float32 if resolve_dtype_policy(policy, device) == "fp32" else torch.bfloat16


def _place(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move to the device; cast only when some tensor has another dtype (diffusers warns on no-op casts). Every
    tensor is checked: weights assigned from a file keep the file's dtypes, which may be mixed."""
    model = model.to(device)
    tensors = [*model.parameters(), *model.buffers()]
    return model if all(t.dtype == dtype for t in tensors if t.is_floating_point()) else model.to(dtype)


def _build(factory: Callable[[], torch.nn.Module], preset: ModelPreset, component: Component,
           device: torch.device) -> torch.nn.Module:
    """Random presets: seeded init directly on the device. Checkpoint presets: parameters on the meta device (no
    memory, no init; buffers stay real), so the checkpoint tensors are assigned in place: the 6.7B T5 is never
    materialised in fp32 first."""
    if preset.is_random:
        torch.manual_seed(preset.random_seed + SEED_OFFSETS[component])
        with torch.device(device):
            return factory().eval()
    from accelerate import init_empty_weights

    with init_empty_weights():
        return factory().eval()


def load_models(
    preset: ModelPreset,
    components: Iterable[Component] = ALL_COMPONENTS,
    checkpoints: Path | None = None,
    device: str | torch.device = "cpu",
    variant: TransformerVariant = "square",
    dtype_policy: DtypePolicy = "auto",
    memory: MemorySettings | None = None,
) -> ModelBundle:
    """Load the requested components of ``preset`` for ``device`` with the dtypes of ``dtype_policy``, placed as
    the memory mode ``memory`` says (default ``full``: everything on ``device``)."""
    from pipeline.keymaps.files import read_state_dict
    from pipeline.memory import apply_memory_mode, check_memory_settings, home_device
    from pipeline.models.audio_encoder import build_audio_encoder, build_feature_extractor, load_audio_encoder
    from pipeline.models.image_encoder import build_image_encoder
    from pipeline.models.text_encoder import build_text_encoder
    from pipeline.models.transformer import StableAvatarTransformer3DModel
    from pipeline.models.vae import build_vae
    from pipeline.text import ByteTokenizer, HFTokenizer

    if preset.torch_threads is not None:
        torch.set_num_threads(preset.torch_threads)
    device = torch.device(device)
    memory = memory or MemorySettings()
    check_memory_settings(memory, device)
    wanted = list(dict.fromkeys(components))
    layout: CheckpointLayout | None = None
    if preset.is_random and checkpoints is not None:
        raise ValueError(f"preset {preset.name!r} has random weights and reads no checkpoints; for the official "
                         f"weights in {checkpoints} use preset 'stableavatar-1.3b'")
    if not preset.is_random:
        if checkpoints is None:
            raise CheckpointNotFoundError(f"preset {preset.name!r} needs --checkpoints DIR (the official layout)")
        layout = CheckpointLayout(Path(checkpoints), variant)
    bundle = ModelBundle(preset, device, state_dtype(device, dtype_policy))

    for component in wanted:
        started = time.perf_counter()
        dtype = bundle.dtypes[component] = component_dtype(component, device, dtype_policy)
        home = home_device(component, memory, device)  # host memory when offloaded
        if component == "transformer" and preset.transformer_factory is not None:
            bundle.transformer = preset.transformer_factory().to(home)
        elif component == "transformer":
            model = _build(lambda: StableAvatarTransformer3DModel(**preset.transformer), preset, component, home)
            if layout:
                from pipeline.keymaps.transformer import (
                    load_transformer_state_dict,
                    transformer_state_dict_from_files,
                )

                layout.require(layout.transformer_audio)
                files = [*layout.transformer_base_files(), layout.transformer_audio]  # the .pt overrides the base
                state = transformer_state_dict_from_files(files)
                load_transformer_state_dict(model, state)
            # Keep diffusers' fp32 modules (norms, modulation tables, time embedder) in fp32 under bf16.
            bundle.transformer = model.to(home).to_inference_dtype(dtype)
        elif component == "vae":
            model = _build(preset.vae_factory or (lambda: build_vae(**preset.vae)), preset, component, home)
            if layout:
                from pipeline.keymaps.vae import load_vae_weights

                layout.require(layout.vae)
                load_vae_weights(model, read_state_dict(layout.vae), assign=True)
            bundle.vae = _place(model, home, dtype)
        elif component == "text_encoder":
            model = _build(lambda: build_text_encoder(**preset.text_encoder), preset, component, home)
            if layout:
                from pipeline.keymaps.text_encoder import load_text_encoder_weights

                layout.require(layout.text_encoder, layout.tokenizer)
                load_text_encoder_weights(model, read_state_dict(layout.text_encoder), assign=True)
                bundle.tokenizer = HFTokenizer(layout.tokenizer)
            else:
                bundle.tokenizer = ByteTokenizer(preset.text_encoder["vocab_size"])
            bundle.text_encoder = _place(model, home, dtype)
        elif component == "image_encoder":
            model = _build(lambda: build_image_encoder(**preset.image_encoder), preset, component, home)
            if layout:
                from pipeline.keymaps.image_encoder import load_image_encoder_weights

                layout.require(layout.image_encoder)
                load_image_encoder_weights(model, read_state_dict(layout.image_encoder), assign=True)
            bundle.image_encoder = _place(model, home, dtype)
        elif component == "audio_encoder":
            if layout:
                layout.require(layout.audio_encoder)
                model, extractor = load_audio_encoder(layout.audio_encoder, home, dtype)
            else:
                model = _build(lambda: build_audio_encoder(**preset.audio_encoder), preset, component, home)
                extractor = build_feature_extractor(**preset.feature_extractor)
            bundle.audio_encoder, bundle.feature_extractor = _place(model, home, dtype), extractor
        else:
            raise ValueError(f"unknown component {component!r}")
        bundle.load_seconds[component] = time.perf_counter() - started
        log.info("loaded %s (%s) in %.1f s", component, preset.name, bundle.load_seconds[component])
    bundle.placement = apply_memory_mode(bundle, memory, bundle.dtypes)
    return bundle
