"""Memory modes (``PipelineSettings.memory``): where each model's weights live, and in which dtype, through the
offload and casting hooks of diffusers and accelerate (no hooks of our own).

* ``model_offload``: accelerate's ``cpu_offload_with_hook``, chained in the order the pipeline uses the models
  (wav2vec -> VAE -> CLIP -> T5 -> DiT): a model's first forward moves it to the device and the previous one back to
  host memory; :meth:`MemoryPlacement.release` sends everything back at the end of a stage.
* ``block_offload``: diffusers' ``apply_group_offloading`` at block level for the DiT (its 30 blocks) and T5 (its 24
  blocks), CUDA streams where available; the small models are offloaded whole as under ``model_offload``. Block
  level, not leaf level: the DiT's forward reads ``patch_embedding.weight.device`` on entry, which leaf-level
  offloading leaves on the host.
* ``fp8_weights``: diffusers' layerwise casting (float8_e4m3fn storage, compute in the component's dtype) for the DiT
  (``enable_layerwise_casting``: its norms, embedders and fp32 modules stay as they are) and T5 (but its FFN output
  projections ``wo``, which transformers keeps in fp32 and whose forward casts its input to the weight's dtype).
  Applied before any offloading, so the host copies that group offloading pins are already fp8.

Offloaded models are built in host memory (``home_device``) and carry their compute device
(``pipeline.models.devices``) for the code that places their inputs.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.models.devices import set_compute_device
from pipeline.settings import MemorySettings

log = logging.getLogger(__name__)

FP8_STORAGE = torch.float8_e4m3fn
FP8_COMPONENTS: tuple[str, ...] = ("transformer", "text_encoder")
GROUP_OFFLOADED: tuple[str, ...] = ("transformer", "text_encoder")  # under block_offload
# The order the in-process pipeline first uses the models (prepare: audio, image, text; denoise; finish: VAE).
USE_ORDER: tuple[str, ...] = ("audio_encoder", "vae", "image_encoder", "text_encoder", "transformer")
# T5's position bias stays in its dtype under fp8 (tiny, and precision-critical), as do its fp32 modules.
T5_FP8_SKIP: tuple[str, ...] = ("relative_attention_bias",)
CPU = torch.device("cpu")


class MemoryModeError(ValueError):
    """A memory mode this device or model cannot run; raised when the models are loaded, never mid-request."""


def check_memory_settings(memory: MemorySettings, device: torch.device | str) -> None:
    """Refuse at start what cannot work on ``device`` (the combinations are checked by ``MemorySettings``)."""
    device = torch.device(device)
    if memory.offload == "block" and memory.use_stream and not _has_streams(device):
        raise MemoryModeError(f"memory.use_stream: streams prefetch blocks onto an accelerator; device {device} "
                              "has none (leave use_stream unset)")


def _has_streams(device: torch.device) -> bool:
    return device.type == "cuda"


def home_device(component: str, memory: MemorySettings, device: torch.device | str) -> torch.device:
    """Where ``component``'s weights are loaded and kept between uses: host memory when offloaded (or T5 with
    ``text_encoder_device: cpu``), else ``device``."""
    if component == "text_encoder" and memory.text_encoder_device == "cpu":
        return CPU
    return CPU if memory.offload != "none" else torch.device(device)


@dataclass
class MemoryPlacement:
    """What :func:`apply_memory_mode` did to a bundle; ``release()`` ends a stage under ``model_offload``."""

    settings: MemorySettings
    device: torch.device
    modes: dict[str, str] = field(default_factory=dict)  # component -> resident / model_offload / ... / cpu
    fp8: list[str] = field(default_factory=list)
    offload_hooks: dict[str, Any] = field(default_factory=dict)  # component -> accelerate UserCpuOffloadHook

    def release(self) -> None:
        """Send the models offloaded whole back to host memory (the end of prepare, denoise or finish). Models
        offloaded by blocks go back on their own after each forward; resident models stay."""
        moved = False
        for hook in self.offload_hooks.values():
            if next(hook.model.parameters()).device != CPU:
                hook.offload()
                moved = True
        if moved and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def describe(self) -> dict[str, Any]:
        return {"mode": self.settings.mode, "device": str(self.device), "components": dict(self.modes),
                "fp8_weights": list(self.fp8)}


def cast_fp8(component: str, model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """float8 e4m3 storage, ``compute_dtype`` compute, with diffusers' layerwise casting hooks."""
    from diffusers.hooks import apply_layerwise_casting
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    if hasattr(model, "enable_layerwise_casting"):  # diffusers models: their own skip lists (fp32 modules, norms)
        model.enable_layerwise_casting(storage_dtype=FP8_STORAGE, compute_dtype=compute_dtype)
    else:  # transformers models: their fp32 modules by exact name (UMT5's FFN 'wo' casts its input to its dtype)
        keep = tuple(rf"(^|\.){name}$" for name in getattr(model, "_keep_in_fp32_modules", None) or ())
        skip = tuple(DEFAULT_SKIP_MODULES_PATTERN) + keep + (T5_FP8_SKIP if component == "text_encoder" else ())
        apply_layerwise_casting(model, FP8_STORAGE, compute_dtype, skip_modules_pattern=skip)


def _group_offload(component: str, model: torch.nn.Module, memory: MemorySettings, device: torch.device) -> None:
    """diffusers' block-level group offloading: the DiT's ``blocks``, T5's ``encoder.block``."""
    from diffusers.hooks import apply_group_offloading

    # T5 runs once per new prompt (cached): its blocks move synchronously; the DiT prefetches on a stream.
    stream = component == "transformer" and (memory.use_stream if memory.use_stream is not None
                                             else _has_streams(device))
    disk = None
    if memory.offload_dir is not None:  # a fresh folder per model: diffusers reuses a group file that exists
        memory.offload_dir.mkdir(parents=True, exist_ok=True)
        disk = tempfile.mkdtemp(prefix=f"{component}-", dir=memory.offload_dir)
        weakref.finalize(model, shutil.rmtree, disk, True)
    apply_group_offloading(
        model, onload_device=device, offload_device=CPU, offload_type="block_level",
        num_blocks_per_group=memory.blocks_per_group if not stream else 1, use_stream=stream,
        record_stream=stream, offload_to_disk_path=disk,
        block_modules=["encoder"] if component == "text_encoder" else None,
    )


def apply_memory_mode(bundle: Any, memory: MemorySettings,
                      compute_dtypes: dict[str, torch.dtype]) -> MemoryPlacement:
    """Apply ``memory`` to the models of ``bundle`` (a ``pipeline.loading.ModelBundle`` whose offloaded models were
    built on their :func:`home_device`); ``compute_dtypes``: each component's dtype (fp8 computes in it)."""
    from accelerate import cpu_offload_with_hook

    device = torch.device(bundle.device)
    check_memory_settings(memory, device)
    placement = MemoryPlacement(memory, device)
    present = [c for c in USE_ORDER if getattr(bundle, c, None) is not None]
    if memory.fp8_weights:
        for component in FP8_COMPONENTS:
            if component in present:
                cast_fp8(component, getattr(bundle, component), compute_dtypes[component])
                placement.fp8.append(component)
    previous = None
    for component in present:
        model = getattr(bundle, component)
        if component == "text_encoder" and memory.text_encoder_device == "cpu":
            placement.modes[component] = "cpu"
        elif memory.offload == "none":
            placement.modes[component] = "resident"
        elif memory.offload == "block" and component in GROUP_OFFLOADED:
            _group_offload(component, model, memory, device)
            set_compute_device(model, device)
            placement.modes[component] = "block_offload"
        else:
            _, previous = cpu_offload_with_hook(model, device, prev_module_hook=previous)
            placement.offload_hooks[component] = previous
            set_compute_device(model, device)
            placement.modes[component] = "model_offload"
    log.info("memory mode %s on %s: %s", memory.mode, device, placement.modes)
    return placement
