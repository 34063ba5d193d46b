"""Shared fixtures: the golden vectors from ../shared/golden and deterministic torch settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("STABLE_AVATAR_GOLDEN", REPO_ROOT.parent / "shared" / "golden"))


class Golden:
    """Reads one golden folder: ``g.tensors("outputs")`` loads ``outputs.safetensors``, ``g.json("meta")``."""

    def __init__(self, folder: str):
        self.path = GOLDEN_DIR / folder
        if not self.path.is_dir():
            pytest.fail(f"golden vectors not found at {self.path} (set STABLE_AVATAR_GOLDEN)")

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(self.path / f"{name}.safetensors")

    def json(self, name: str) -> dict:
        return json.loads((self.path / f"{name}.json").read_text())


@pytest.fixture(scope="session")
def golden():
    return Golden


# Real servers (session scope), started on first use: PostgreSQL (Debian's postgresql package, a throw-away
# cluster) and SeaweedFS S3.
from tests.postgres import postgres  # noqa: E402, F401
from tests.seaweedfs import s3_env, seaweedfs  # noqa: E402, F401
