"""wav2vec 2.0 audio features (``transformers.Wav2Vec2Model.last_hidden_state``) as StableAvatar computes them.

Each window's audio slice is normalised on its own (zero mean, unit variance over the slice) by the feature
extractor, then encoded; no layer mixing and no resampling to the video frame rate (~50 tokens per second).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from pipeline.keymaps.audio_encoder import load_audio_encoder_weights
from pipeline.keymaps.files import read_state_dict
from pipeline.media.rates import SAMPLE_RATE

from .devices import compute_device

# Regularisers that only act in training; zeroed so a model accidentally left in train mode still matches.
TRAINING_ONLY = {
    "layerdrop": 0.0,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "feat_proj_dropout": 0.0,
    "final_dropout": 0.0,
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def build_audio_encoder(**config: Any) -> Wav2Vec2Model:
    """``Wav2Vec2Model`` in eval mode without gradients; layerdrop/dropout off (layerdrop even drops outputs)."""
    model = Wav2Vec2Model(Wav2Vec2Config(**{**config, **TRAINING_ONLY}))
    return model.eval().requires_grad_(False)


def build_feature_extractor(**config: Any) -> Wav2Vec2FeatureExtractor:
    """Waveform normaliser: 16 kHz mono, per-chunk zero-mean/unit-variance (``do_normalize=True``) by default."""
    defaults = {"feature_size": 1, "sampling_rate": SAMPLE_RATE, "padding_value": 0.0, "do_normalize": True,
                "return_attention_mask": False}
    extractor = Wav2Vec2FeatureExtractor(**{**defaults, **config})
    if extractor.sampling_rate != SAMPLE_RATE:
        raise ValueError(f"wav2vec2 feature extractor must run at {SAMPLE_RATE} Hz, got {extractor.sampling_rate}")
    return extractor


@torch.no_grad()
def audio_features(
    model: Wav2Vec2Model, extractor: Wav2Vec2FeatureExtractor, samples: np.ndarray
) -> torch.Tensor:
    """Mono float32 16 kHz samples [n] -> features [1,N,C] (N ~ n/320 from the conv stack)."""
    values = extractor(
        np.asarray(samples, dtype=np.float32), sampling_rate=extractor.sampling_rate, return_tensors="pt"
    ).input_values  # [1,n], normalised over this chunk only
    dtype = model.feature_projection.projection.weight.dtype
    return model(values.to(compute_device(model), dtype)).last_hidden_state  # [1,N,C]


def load_audio_encoder(
    folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Wav2Vec2Model, Wav2Vec2FeatureExtractor]:
    """Read an HF-format wav2vec2 folder offline: ``config.json``, weights, ``preprocessor_config.json``.

    Weights go through the strict key map (``pipeline.keymaps.audio_encoder``) rather than ``from_pretrained``,
    which would load a half-matching checkpoint with only a warning.
    """
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder}: none of {', '.join(WEIGHT_FILES)} found")
    model = build_audio_encoder(**config)
    load_audio_encoder_weights(model, read_state_dict(weights))
    extractor = build_feature_extractor(**json.loads((folder / "preprocessor_config.json").read_text()))
    return model.to(device=device, dtype=dtype), extractor
