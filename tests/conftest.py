"""The suite's set-up: deterministic torch settings, the shared fixtures and tiers (``testing``), the golden vectors."""

from __future__ import annotations

import os

import pytest
import torch

from testing.ray_env import use_test_cluster_env
from tests.helpers import Golden

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)
use_test_cluster_env()  # before any cluster or CLI subprocess starts

# The real servers (PostgreSQL, SeaweedFS S3) and the shared Ray cluster, started on first use; the tier markers.
pytest_plugins = ["testing.fixtures", "testing.tiers"]


@pytest.fixture(scope="session")
def golden() -> type[Golden]:
    """``golden("vae").tensors("outputs")``: the upstream golden vectors (``tests/golden/``)."""
    return Golden
