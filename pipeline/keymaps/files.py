"""Reading checkpoint files into a flat ``{name: tensor}`` dict, and the strict copy into a module."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.keymaps import check_keys

SAFETENSORS_SUFFIXES = {".safetensors"}
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}
WRAPPER_KEYS = ("state_dict", "model")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load every tensor of ``path`` on the CPU.

    ``.safetensors`` goes through safetensors; torch pickles (``.pt/.pth/.bin``) are read with ``weights_only=True``
    (no code execution from a downloaded file) and memory-mapped where the file format allows it, so a 12 GiB text
    encoder does not have to fit twice in RAM. Training checkpoints that wrap the weights in a top-level
    ``"state_dict"`` or ``"model"`` dict are unwrapped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return dict(load_file(str(path), device="cpu"))
    if suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"unsupported checkpoint format {path.name!r}: expected .safetensors, .pt, .pth or .bin")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        # Files written with the legacy (non-zip) serialisation cannot be memory-mapped; read them normally.
        if "mmap" not in str(err):
            raise
        obj = torch.load(path, map_location="cpu", weights_only=True)
    return _flatten(obj, path)


def _flatten(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict": {...}}`` / ``{"model": {...}}`` and insist that what remains is all tensors."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path.name}: expected a dict of tensors, found {type(obj).__name__}")
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            obj = inner
            break
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path.name}: entries that are not tensors: {', '.join(sorted(bad)[:12])}")
    return {str(k): v for k, v in obj.items()}


def load_checked(
    component: str, module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, assign: bool = False
) -> None:
    """Strict copy of already-converted weights into ``module``.

    Keys are checked first (errors name them), then loaded with ``strict=True``. ``assign``: a model built on the
    ``meta`` device (to avoid allocating a 6.7B-parameter fp32 copy first) takes the checkpoint tensors themselves.
    """
    check_keys(component, module.state_dict().keys(), state_dict.keys())
    module.load_state_dict(dict(state_dict), strict=True, assign=assign)
