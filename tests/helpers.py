"""The golden vectors (``tests/golden/``, computed with the original StableAvatar code; see its README) and how
our outputs are compared with them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# STABLE_AVATAR_GOLDEN points the suite at another copy (a regenerated set, say).
GOLDEN_DIR = Path(os.environ.get("STABLE_AVATAR_GOLDEN", Path(__file__).resolve().parent / "golden"))

# The golden vectors are bit-exact on the CPU that made them. Another CPU family's convolution/matmul kernels
# (MKL/oneDNN AVX2 vs AVX-512 code paths) round differently by a few fp32 ulps: measured max |d| 4.4e-6 (VAE
# decode, values in [-1, 1]) and 1.5e-6 (CLIP tokens up to 6) on an AVX-512 Xeon. Our own code paths against each
# other on one machine stay bit-exact (checked with torch.equal where it matters).
GOLDEN_CROSS_CPU_ATOL = 1e-5


class Golden:
    """Reads one golden folder: ``g.tensors("outputs")`` loads ``outputs.safetensors``, ``g.json("meta")``."""

    def __init__(self, folder: str):
        self.path = GOLDEN_DIR / folder
        if not self.path.is_dir():
            pytest.fail(f"golden vectors not found at {self.path} (STABLE_AVATAR_GOLDEN overrides tests/golden)")

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(self.path / f"{name}.safetensors")

    def json(self, name: str) -> dict:
        return json.loads((self.path / f"{name}.json").read_text())


def assert_golden(actual, golden) -> None:
    """``actual`` equals an upstream golden tensor up to cross-CPU rounding (shape and dtype exact)."""
    torch.testing.assert_close(actual, golden, atol=GOLDEN_CROSS_CPU_ATOL, rtol=0)
