"""``stable-avatar download-weights`` fetches every file ``load_models`` reads from the official layout.

``download_weights`` hands ``ALLOW_PATTERNS`` to ``huggingface_hub.snapshot_download``, which filters the repo's
file list with ``filter_repo_objects``; the same function is applied here to the paths ``CheckpointLayout`` (and the
folders it points at) resolve to, so renaming a file on either side fails here instead of after a 27-36 GB download.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub.utils import filter_repo_objects

from pipeline.loading import CheckpointLayout
from pipeline.models.audio_encoder import WEIGHT_FILES
from pipeline.text import HFTokenizer
from pipeline.weights import ALLOW_PATTERNS, allow_patterns

ROOT = Path("/ckpt")  # stands for the --dir of the download; only paths relative to it matter
# Files read inside the folders the layout names (one of the wav2vec weight files is enough at load time).
FOLDER_FILES = {
    "tokenizer": [HFTokenizer.FILE, "tokenizer_config.json", "special_tokens_map.json", "spiece.model"],
    "audio_encoder": ["config.json", "preprocessor_config.json", *WEIGHT_FILES],
    "wan_dir": ["config.json"],
}
SHARDS = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]


def layout_paths(layout: CheckpointLayout) -> dict[str, list[str]]:
    """``{layout property: [repo-relative paths it makes load_models read]}``, for every Path property."""
    out: dict[str, list[str]] = {}
    for name in sorted(vars(CheckpointLayout)):
        if not isinstance(getattr(CheckpointLayout, name), property) or name == "root":
            continue
        value = getattr(layout, name)
        paths = list(value) if isinstance(value, tuple) else [value]
        if not all(isinstance(p, Path) for p in paths):
            continue
        if name in FOLDER_FILES:
            paths = [p / f for p in paths for f in FOLDER_FILES[name]]
        if name == "transformer_base_candidates":
            paths += [layout.wan_dir / s for s in SHARDS]
        out[name] = [p.relative_to(layout.root).as_posix() for p in paths]
    return out


@pytest.mark.parametrize("variant", ["square", "rec-vec"])
def test_every_file_the_loader_reads_is_downloaded(variant):
    paths = layout_paths(CheckpointLayout(ROOT, variant))
    assert {"transformer_audio", "transformer_base_candidates", "vae", "text_encoder", "tokenizer",
            "image_encoder", "audio_encoder"} <= paths.keys()
    wanted = [p for ps in paths.values() for p in ps]
    kept = set(filter_repo_objects(wanted, allow_patterns=ALLOW_PATTERNS))
    assert [p for p in wanted if p not in kept] == []
    assert f"StableAvatar-1.3B/transformer3d-{variant}.pt" in kept


def test_optional_and_training_files_are_not_downloaded():
    """The vocal separator (optional preprocessing, not used by inference) stays on the hub."""
    skipped = ["Kim_Vocal_2.onnx", "StableAvatar-1.3B/optimizer.bin", "README.md"]
    assert list(filter_repo_objects(skipped, allow_patterns=ALLOW_PATTERNS)) == []


# Bytes per parameter of each downloaded file, from its published dtype; the two StableAvatar .pt files' dtype is not
# published (bf16 or fp32 master weights), and wav2vec2-base-960h's folder carries one copy per framework (1..4).
DOWNLOAD_PARTS = {  # manifest: (bytes per parameter, copies) as (low, high)
    "upstream_text_encoder_module.json": ((2, 1), (2, 1)),  # models_t5_umt5-xxl-enc-bf16.pth
    "upstream_image_encoder_file.json": ((4, 1), (4, 1)),  # the open-clip .pth, fp32
    "upstream_transformer_base_file_assumed.json": ((2, 1), (2, 1)),  # diffusion_pytorch_model.safetensors, bf16
    "upstream_vae_file.json": ((4, 1), (4, 1)),  # Wan2.1_VAE.pth, fp32
    "upstream_audio_encoder_file.json": ((4, 1), (4, 4)),
    "upstream_transformer_module.json": ((2, 2), (4, 2)),  # transformer3d-square.pt + transformer3d-rec-vec.pt
}


@pytest.mark.golden  # the real-size manifests among the golden vectors
def test_the_readmes_download_size_matches_the_real_parameter_counts():
    """The size both READMEs quote for ``download-weights`` is what the real-size manifests' parameter counts give."""
    import json
    import math

    from tests.helpers import GOLDEN_DIR

    real_size = GOLDEN_DIR / "real-size"
    low = high = 0
    for manifest, ((low_bytes, low_copies), (high_bytes, high_copies)) in DOWNLOAD_PARTS.items():
        params = sum(math.prod(shape) for shape in json.loads((real_size / manifest).read_text())["params"].values())
        low, high = low + params * low_bytes * low_copies, high + params * high_bytes * high_copies
    quoted = f"{math.floor(low / 1e9)}-{math.ceil(high / 1e9)} GB"
    assert quoted == "27-36 GB", (low / 1e9, high / 1e9)
    repo = Path(__file__).resolve().parents[1]
    assert f"about {quoted}" in (repo / "README.md").read_text()
    assert f"~{quoted}" in (repo / "k8s" / "README.md").read_text()


@pytest.mark.parametrize("variant,other", [("square", "rec-vec"), ("rec-vec", "square")])
def test_one_variant_fetches_only_its_transformer_file(variant, other):
    patterns = allow_patterns(variant)
    files = [f"StableAvatar-1.3B/transformer3d-{v}.pt" for v in (variant, other)]
    assert list(filter_repo_objects(files, allow_patterns=patterns)) == [files[0]]
    wanted = [p for ps in layout_paths(CheckpointLayout(ROOT, variant)).values() for p in ps]
    assert set(filter_repo_objects(wanted, allow_patterns=patterns)) == set(
        filter_repo_objects(wanted, allow_patterns=ALLOW_PATTERNS))  # everything else the loader reads
    with pytest.raises(ValueError, match="unknown transformer variant"):
        allow_patterns("portrait")


def test_download_weights_takes_a_variant():
    from stable_avatar.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["download-weights", "--dir", "d"]).variant == "all"
    assert parse(["download-weights", "--dir", "d", "--variant", "rec-vec"]).variant == "rec-vec"
