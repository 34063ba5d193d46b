"""Download of the official checkpoint layout from the Hugging Face Hub (never used by tests: they are offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

REPO_ID = "FrancisRing/StableAvatar"
VariantChoice = Literal["square", "rec-vec", "all"]
VARIANTS: tuple[str, ...] = ("square", "rec-vec")
# Only what inference reads: the vocal separator ONNX and training leftovers are skipped.
COMMON_PATTERNS = [
    "Wan2.1-Fun-V1.1-1.3B-InP/*",
    "Wan2.1-Fun-V1.1-1.3B-InP/google/umt5-xxl/*",
    "wav2vec2-base-960h/*",
]


def allow_patterns(variant: VariantChoice = "all") -> list[str]:
    """The hub paths to fetch: the shared files plus one StableAvatar transformer file (or both)."""
    if variant not in (*VARIANTS, "all"):
        raise ValueError(f"unknown transformer variant {variant!r}; choose {', '.join(VARIANTS)} or all")
    chosen = VARIANTS if variant == "all" else (variant,)
    return [*COMMON_PATTERNS, *(f"StableAvatar-1.3B/transformer3d-{v}.pt" for v in chosen)]


ALLOW_PATTERNS = allow_patterns("all")


def download_weights(directory: Path, repo_id: str = REPO_ID, variant: VariantChoice = "all") -> Path:
    from huggingface_hub import snapshot_download

    directory.mkdir(parents=True, exist_ok=True)
    snapshot_download(repo_id=repo_id, local_dir=str(directory), allow_patterns=allow_patterns(variant))
    return directory
