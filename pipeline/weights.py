"""Download of the official checkpoint layout from the Hugging Face Hub (never used by tests: they are offline)."""

from __future__ import annotations

from pathlib import Path

REPO_ID = "FrancisRing/StableAvatar"
# Only what inference reads: the vocal separator ONNX and training leftovers are skipped.
ALLOW_PATTERNS = [
    "Wan2.1-Fun-V1.1-1.3B-InP/*",
    "Wan2.1-Fun-V1.1-1.3B-InP/google/umt5-xxl/*",
    "StableAvatar-1.3B/transformer3d-square.pt",
    "StableAvatar-1.3B/transformer3d-rec-vec.pt",
    "wav2vec2-base-960h/*",
]


def download_weights(directory: Path, repo_id: str = REPO_ID) -> Path:
    from huggingface_hub import snapshot_download

    directory.mkdir(parents=True, exist_ok=True)
    snapshot_download(repo_id=repo_id, local_dir=str(directory), allow_patterns=ALLOW_PATTERNS)
    return directory
