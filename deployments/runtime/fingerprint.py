"""The model fingerprint: what a job's video depends on besides its input and seed.

It hashes the preset's definition, the weights' identity and the settings that change the output (window policy,
guidance and step-cache settings, fp8 weights, dtype policies), and nothing that only changes speed or memory
(replica counts, offload, compile, cache sizes). Submits record it, claims take only jobs of their own fingerprint
and checkpoints carry it, so during an upgrade that changes the weights or those settings the old application
finishes the jobs submitted to it and never resumes (or is resumed from) the other's latents.

The weights' identity is each file's relative path, size and modification time under ``checkpoints``: a stat per
file, never a byte of the gigabytes read, so every replica computes it at start in milliseconds. It assumes one
copy of the weights per application (the KubeRay manifests mount one volume): copies written at different times
have different fingerprints. Only processes that see the weights compute it (the Preprocessors); the Orchestrators
and Gateways ask them, so every part of an application agrees.

No torch, no Ray: the Gateway's process imports what this module imports.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deployments.config import AppArgs

FINGERPRINT_VERSION = 1  # bump when the hashed content changes meaning
FINGERPRINT_CHARS = 16


def weights_identity(checkpoints: Path | None) -> list[tuple[str, int, int]]:
    """``(relative path, size, mtime_ns)`` of every file under ``checkpoints`` (hidden ones skipped: download
    caches and markers), sorted; empty without checkpoints (random weights from the preset's seed)."""
    if checkpoints is None:
        return []
    root = Path(checkpoints)
    files = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        stat = path.stat()
        files.append((relative.as_posix(), stat.st_size, stat.st_mtime_ns))
    return sorted(files)


def _named(value: Any) -> Any:
    """JSON-able, with callables (a benchmark's stand-in factories) by their qualified name; a
    ``functools.partial`` by its function's name and the arguments bound to it, which may change the output."""
    if isinstance(value, functools.partial):
        return {"partial": _named(value.func), "args": [_named(a) for a in value.args],
                "keywords": {k: _named(v) for k, v in sorted(value.keywords.items())}}
    if callable(value):
        return f"{value.__module__}.{value.__qualname__}"
    return value


def output_settings(args: AppArgs) -> dict[str, Any]:
    """The settings (beyond the weights) that change a job's video."""
    preset = args.model_preset()
    definition = {f.name: _named(getattr(preset, f.name)) for f in dataclasses.fields(preset)
                  if f.name != "description"}
    pipeline = args.pipeline
    step_cache = pipeline.step_cache.model_dump(exclude={"max_entries", "max_bytes"})
    return {
        "version": FINGERPRINT_VERSION, "preset": definition, "variant": args.variant, "device": args.device,
        "dtype_policies": {name: args.replica_dtype_policy(getattr(args, name))
                           for name in ("preprocessor", "denoiser", "postprocessor")},
        "pipeline": pipeline.model_dump(mode="json", include={"overlap", "window_policy", "audio_window_frames",
                                                              "weight_scheme", "negative_prompt",
                                                              "split_guidance_rows", "acceleration"}),
        "step_cache": step_cache, "fp8_weights": "fp8_weights" in pipeline.memory.mode,
    }


def model_fingerprint(args: AppArgs) -> str:
    """The application's fingerprint (16 hex digits); equal on every replica that sees the same weights."""
    content = {"settings": output_settings(args), "weights": weights_identity(args.checkpoints)}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_CHARS]
