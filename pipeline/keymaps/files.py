"""Reading checkpoint files into a flat ``{name: tensor}`` dict, and the strict copy into a module.

Checkpoints arrive in the shapes training and the hub give them: plain state dicts, state dicts wrapped in a
training checkpoint (``{"state_dict": ...}``, ``{"module": ...}``, ``{"model": ...}`` beside ``epoch``,
``optimizer``...), keys prefixed by the wrappers that saved them (``module.`` for DDP/DeepSpeed, ``_orig_mod.`` for
``torch.compile``), and weights sharded over several files named by a ``*.index.json``. Everything here reduces
them to one flat dict with the model's own names, or fails naming the file, the entry or the key at fault.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.keymaps import check_keys

SAFETENSORS_SUFFIXES = {".safetensors"}
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}
# Keys under which training checkpoints keep the weights, beside non-tensor entries (epoch, optimizer, ...).
WRAPPER_KEYS = ("state_dict", "module", "model")
MAX_WRAPPER_DEPTH = 3  # e.g. {"model": {"state_dict": {...}}}; deeper nesting is not a checkpoint we know
# Name prefixes added by the object that saved the weights: DistributedDataParallel / DeepSpeed (``module.``) and
# torch.compile's OptimizedModule (``_orig_mod.``), in any order and combination.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
COMPILED_INFIX = "._orig_mod."  # a compiled submodule: ``blocks.0._orig_mod.attn1...``
INDEX_SUFFIX = ".index.json"


class CheckpointFileError(ValueError):
    """A checkpoint file (or a shard index) is not what its name promises; the message names the file and key."""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load every tensor of ``path`` on the CPU, unwrapped and with wrapper prefixes removed.

    ``.safetensors`` goes through safetensors; torch pickles (``.pt/.pth/.bin/.ckpt``) are read with
    ``weights_only=True`` (no code execution from a downloaded file) and memory-mapped where the file format allows
    it, so a 12 GiB text encoder does not have to fit twice in RAM. A ``*.index.json`` reads the shards it names.
    """
    path = Path(path)
    if path.name.endswith(INDEX_SUFFIX):
        return read_sharded_state_dict(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return strip_wrapper_prefixes(dict(load_file(str(path), device="cpu")), path)
    if suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"unsupported checkpoint format {path.name!r}: expected .safetensors, .pt, .pth or .bin")
    return strip_wrapper_prefixes(unwrap_state_dict(_load_pickle(path), path), path)


def _load_pickle(path: Path) -> object:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            # Files written with the legacy (non-zip) serialisation cannot be memory-mapped; read them normally.
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # an object weights_only refuses to build (optimizer classes, ...)
        raise CheckpointFileError(
            f"{path.name}: holds objects other than tensors and plain containers, refused for safety; save only "
            f"the weights (model.state_dict()): {str(err).splitlines()[0]}") from None


def unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside a saved object: the object itself, or the one under a ``WRAPPER_KEYS`` entry.

    A training checkpoint keeps other entries beside the weights (``epoch``, ``optimizer``, ``lr_scheduler``...);
    they are ignored once a wrapper key is found. Two wrapper keys that both hold weights are ambiguous and refused.
    """
    for _ in range(MAX_WRAPPER_DEPTH + 1):
        if not isinstance(obj, Mapping):
            raise CheckpointFileError(f"{path.name}: expected a dict of tensors, found {type(obj).__name__}")
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {str(k): v for k, v in obj.items()}
        wrapped = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping) and obj[k]]
        if len(wrapped) > 1:
            raise CheckpointFileError(
                f"{path.name}: several entries could hold the weights ({', '.join(wrapped)}); keep one")
        if not wrapped:
            bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
            found = f"entries that are not tensors: {', '.join(bad[:12])}" if obj else "an empty dict"
            raise CheckpointFileError(
                f"{path.name}: {found} (and no {'/'.join(WRAPPER_KEYS)} entry holding the weights)")
        obj = obj[wrapped[0]]
    raise CheckpointFileError(f"{path.name}: weights nested deeper than {MAX_WRAPPER_DEPTH} wrapper levels")


def strip_wrapper_prefix(key: str) -> str:
    """``module._orig_mod.blocks.0...`` -> ``blocks.0...`` (leading prefixes in any order, compiled submodules)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    while COMPILED_INFIX in key:
        key = key.replace(COMPILED_INFIX, ".")
    return key


def strip_wrapper_prefixes(sd: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Apply ``strip_wrapper_prefix`` to every key; two keys that become one name are an error naming both."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in sd.items():
        name = strip_wrapper_prefix(key)
        if name in out:
            raise CheckpointFileError(
                f"{path.name}: keys {origin[name]!r} and {key!r} are the same weight {name!r} once the "
                f"{'/'.join(WRAPPER_PREFIXES)} prefixes are removed")
        out[name], origin[name] = value, key
    return out


def read_sharded_state_dict(index_path: Path) -> dict[str, torch.Tensor]:
    """Read the shards a hub ``*.index.json`` names (``{"weight_map": {key: shard file}}``), honouring the index.

    Every shard must exist, every key the index names must be in the shard it names, and a shard may hold no key
    the index does not give to it: a half-copied download fails here, naming the file or key, not later as a
    "missing key" whose cause is invisible.
    """
    index_path = Path(index_path)
    if not index_path.is_file():
        raise FileNotFoundError(f"shard index not found: {index_path}")
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointFileError(f"{index_path.name}: not a shard index with a 'weight_map' ({err})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointFileError(f"{index_path.name}: 'weight_map' must map weight names to shard files")
    by_shard: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or "/" in shard or shard in ("", ".", ".."):
            raise CheckpointFileError(f"{index_path.name}: weight {key!r} names an invalid shard {shard!r}")
        by_shard.setdefault(shard, set()).add(key)
    missing_files = [s for s in sorted(by_shard) if not (index_path.parent / s).is_file()]
    if missing_files:
        raise FileNotFoundError(
            f"{index_path.name} names shards that are not in {index_path.parent}: {', '.join(missing_files)}")
    merged: dict[str, torch.Tensor] = {}
    for shard in sorted(by_shard):
        path = index_path.parent / shard
        if path.suffix.lower() in SAFETENSORS_SUFFIXES:  # raw names: the index lists the file's own spelling
            tensors = dict(load_file(str(path), device="cpu"))
        else:
            tensors = unwrap_state_dict(_load_pickle(path), path)
        wanted = by_shard[shard]
        absent = sorted(wanted - tensors.keys())
        if absent:
            raise CheckpointFileError(
                f"{index_path.name} puts {len(absent)} weight(s) in {shard}, which does not hold them: "
                + ", ".join(absent[:12]))
        stray = sorted(tensors.keys() - wanted)
        if stray:
            raise CheckpointFileError(
                f"{shard} holds {len(stray)} weight(s) that {index_path.name} does not assign to it: "
                + ", ".join(stray[:12]))
        merged.update(tensors)
    return strip_wrapper_prefixes(merged, index_path)


def load_checked(
    component: str, module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, assign: bool = False
) -> None:
    """Strict copy of already-converted weights into ``module``.

    Keys are checked first (errors name them), then loaded with ``strict=True``. ``assign``: a model built on the
    ``meta`` device (to avoid allocating a 6.7B-parameter fp32 copy first) takes the checkpoint tensors themselves.
    """
    check_keys(component, module.state_dict().keys(), state_dict.keys())
    module.load_state_dict(dict(state_dict), strict=True, assign=assign)
