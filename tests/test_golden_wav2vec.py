"""wav2vec 2.0 features through the strict HF-folder loader, against the end-to-end golden run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.keymaps import CheckpointKeyError
from pipeline.keymaps.audio_encoder import load_audio_encoder_weights
from pipeline.keymaps.files import read_state_dict
from pipeline.models.audio_encoder import audio_features, build_audio_encoder, load_audio_encoder

ATOL = 1e-5  # measured 0 (bit-exact)
POS_CONV = "encoder.pos_conv_embed.conv"


@pytest.fixture(scope="module")
def folder(golden) -> Path:
    return golden("pipeline").path / "wav2vec"


@pytest.fixture(scope="module")
def loaded(folder):
    return load_audio_encoder(folder, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def run(golden):
    return golden("pipeline").tensors("run")


@pytest.fixture(scope="module")
def state_dict(folder):
    return read_state_dict(folder / "model.safetensors")


def _windows(golden):
    return {w["index_start"]: (w["audio_sample_start"], w["audio_sample_end"])
            for w in golden("pipeline").json("meta")["windows"]}


def test_window_features_match(golden, loaded, run):
    model, extractor = loaded
    audio = run["audio"].numpy()
    windows = _windows(golden)
    assert windows == {0: (0, 53760), 16: (40960, 63483)}
    for start, (a, b) in windows.items():
        feats = audio_features(model, extractor, audio[a:b])  # [1,N,32]
        want = run[f"wav2vec/win{start}"]
        assert feats.shape == want.shape
        torch.testing.assert_close(feats, want, atol=ATOL, rtol=0)


def _ctc_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What an older ``Wav2Vec2ForCTC`` file looks like: prefixed, weight_g/weight_v, with a CTC head."""
    renames = {f"{POS_CONV}.parametrizations.weight.original0": f"{POS_CONV}.weight_g",
               f"{POS_CONV}.parametrizations.weight.original1": f"{POS_CONV}.weight_v"}
    out = {"wav2vec2." + renames.get(k, k): v for k, v in sd.items()}
    out["lm_head.weight"], out["lm_head.bias"] = torch.zeros(32, 32), torch.zeros(32)
    return out


def test_ctc_checkpoint_from_pytorch_bin(tmp_path, golden, folder, state_dict, run):
    """``pytorch_model.bin`` in ForCTC layout (prefix, weight_g/weight_v, lm_head) loads to the same features."""
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(folder / name, tmp_path / name)
    torch.save(_ctc_layout(state_dict), tmp_path / "pytorch_model.bin")
    model, extractor = load_audio_encoder(tmp_path, "cpu", torch.float32)
    a, b = _windows(golden)[16]
    torch.testing.assert_close(audio_features(model, extractor, run["audio"].numpy()[a:b]), run["wav2vec/win16"],
                               atol=ATOL, rtol=0)


def test_masked_spec_embed_dropped_only_when_model_lacks_it(folder, state_dict, loaded):
    config = json.loads((folder / "config.json").read_text())
    plain = build_audio_encoder(**{**config, "mask_time_prob": 0.0, "mask_feature_prob": 0.0})
    assert "masked_spec_embed" not in plain.state_dict()
    load_audio_encoder_weights(plain, state_dict)  # dropped, no error
    model, _ = loaded
    sd = {k: v for k, v in state_dict.items() if k != "masked_spec_embed"}
    with pytest.raises(CheckpointKeyError, match="masked_spec_embed"):
        load_audio_encoder_weights(model, sd)


def test_missing_key_is_named(loaded, state_dict):
    model, _ = loaded
    key = "encoder.layers.1.attention.q_proj.bias"
    with pytest.raises(CheckpointKeyError, match=key.replace(".", r"\.")) as err:
        load_audio_encoder_weights(model, {k: v for k, v in state_dict.items() if k != key})
    assert err.value.missing == [key] and not err.value.unexpected


def test_unexpected_key_is_named(loaded, state_dict):
    model, _ = loaded
    sd = {**_ctc_layout(state_dict), "wav2vec2.quantizer.codevectors": torch.zeros(1)}
    with pytest.raises(CheckpointKeyError, match=r"wav2vec2\.quantizer\.codevectors") as err:
        load_audio_encoder_weights(model, sd)
    assert err.value.unexpected == ["wav2vec2.quantizer.codevectors"] and not err.value.missing


def test_read_state_dict_unwraps_training_checkpoints(tmp_path, state_dict):
    for wrapper in ("state_dict", "model"):
        path = tmp_path / f"{wrapper}.pth"
        torch.save({wrapper: state_dict, "epoch": 3}, path)
        got = read_state_dict(path)
        assert got.keys() == state_dict.keys() and all(torch.equal(got[k], state_dict[k]) for k in got)
    with pytest.raises(ValueError, match="unsupported"):
        read_state_dict(tmp_path / "weights.onnx")
