"""The real checkpoints' key names and shapes (golden/real-size, from the upstream classes) through every key map.

Each component of the ``stableavatar-1.3b`` preset is built on the meta device and loaded, with ``assign=True``,
from meta tensors named and shaped as in the real files: strict key checks and PyTorch's shape checks run exactly
as with the real weights, and nothing is allocated. A key-map or preset change that would break the first load of
the real model fails here.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from accelerate import init_empty_weights

from pipeline.keymaps import CheckpointKeyError
from pipeline.keymaps.audio_encoder import load_audio_encoder_weights
from pipeline.keymaps.files import WRAPPER_PREFIXES, strip_wrapper_prefix
from pipeline.keymaps.image_encoder import load_image_encoder_weights
from pipeline.keymaps.text_encoder import load_text_encoder_weights
from pipeline.keymaps.transformer import load_transformer_state_dict
from pipeline.keymaps.vae import load_vae_weights
from pipeline.models.audio_encoder import build_audio_encoder
from pipeline.models.image_encoder import build_image_encoder
from pipeline.models.text_encoder import build_text_encoder
from pipeline.models.transformer import StableAvatarTransformer3DModel
from pipeline.models.vae import build_vae
from pipeline.presets import PRESETS
from tests.helpers import GOLDEN_DIR

pytestmark = pytest.mark.golden  # reads the real-size manifests among the golden vectors

REAL = PRESETS["stableavatar-1.3b"]
MANIFESTS = GOLDEN_DIR / "real-size"


def manifest(name: str) -> dict[str, torch.Tensor]:
    path = MANIFESTS / f"upstream_{name}.json"
    if not path.is_file():
        pytest.fail(f"real-size manifest not found at {path} (set STABLE_AVATAR_GOLDEN)")
    data = json.loads(path.read_text())
    assert len(data["params"]) == data["count"]
    return {k: torch.empty(shape, device="meta") for k, shape in data["params"].items()}


def build(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with init_empty_weights():
        return factory()


def load_transformer(sd):
    model = build(lambda: StableAvatarTransformer3DModel(**REAL.transformer))
    load_transformer_state_dict(model, sd)
    return model


def load_vae(sd):
    model = build(lambda: build_vae(**REAL.vae))
    load_vae_weights(model, sd, assign=True)
    return model


def load_text_encoder(sd):
    model = build(lambda: build_text_encoder(**REAL.text_encoder))
    load_text_encoder_weights(model, sd, assign=True)
    return model


def load_image_encoder(sd):
    model = build(lambda: build_image_encoder(**REAL.image_encoder))
    load_image_encoder_weights(model, sd, assign=True)
    return model


def load_audio_encoder(sd):
    model = build(lambda: build_audio_encoder(**REAL.audio_encoder))
    load_audio_encoder_weights(model, sd, assign=True)
    return model


def dropped_clip(key: str) -> bool:  # the text tower and the contrastive head are not loaded
    return key.startswith("textual.") or key in ("log_scale", "visual.head")


# manifest -> (loader, keys of the file that the loaded module does not hold)
CASES = {
    "transformer_module": (load_transformer, lambda k: False),  # StableAvatar-1.3B/transformer3d-*.pt
    "vae_file": (load_vae, lambda k: False),  # Wan2.1_VAE.pth
    "text_encoder_module": (load_text_encoder, lambda k: False),  # models_t5_umt5-xxl-enc-bf16.pth
    "image_encoder_file": (load_image_encoder, dropped_clip),  # models_clip_open-clip-...-14.pth
    "audio_encoder_file": (load_audio_encoder, lambda k: k.startswith("lm_head.")),  # wav2vec2-base-960h (CTC)
}


@pytest.mark.parametrize("name", list(CASES))
def test_real_checkpoint_keys_and_shapes_load(name):
    """Strict keys and shapes; and every weight of the file (but the dropped ones) lands in the module once."""
    loader, dropped = CASES[name]
    sd = manifest(name)
    model = loader(sd)
    expected = sum(v.numel() for k, v in sd.items() if not dropped(k))
    assert sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers()
                                                            if b.is_meta) == expected


def test_transformer_size_matches_the_reference_notes():
    """1,747.4 M parameters (reference notes §1.3: 1,564.4 M base + 183.0 M audio)."""
    model = load_transformer(manifest("transformer_module"))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 1747.4


def test_base_file_plus_audio_modules_make_the_pt():
    """The base safetensors (assumed names) holds the .pt minus the audio modules, so base + .pt loads too."""
    base, full = manifest("transformer_base_file_assumed"), manifest("transformer_module")
    audio = full.keys() - base.keys()
    assert base.keys() < full.keys()
    assert all(k.startswith("vocal_projector.") or ".k_vocal." in k or ".v_vocal." in k for k in audio)
    load_transformer({**base, **{k: full[k] for k in audio}})


def test_no_real_key_carries_a_wrapper_prefix():
    """Prefix stripping (module., _orig_mod.) never renames a genuine key of any real file."""
    for name in ["transformer_module", "vae_file", "text_encoder_module", "image_encoder_file",
                 "audio_encoder_file"]:
        for key in manifest(name):
            assert strip_wrapper_prefix(key) == key and not key.startswith(WRAPPER_PREFIXES), (name, key)


def test_real_vae_latent_statistics():
    stats = json.loads((MANIFESTS / "upstream_vae_stats.json").read_text())
    vae = build(lambda: build_vae(**REAL.vae))
    assert vae.config.latents_mean == pytest.approx(stats["mean"], abs=1e-6)
    assert vae.config.latents_std == pytest.approx(stats["std"], abs=1e-6)


@pytest.mark.parametrize("key,shape,named", [
    # audio projected to the wrong width (named as the model spells it: cross_attn -> attn2)
    ("blocks.0.cross_attn.k_vocal.weight", [1536, 768], "size mismatch for blocks.0.attn2.k_vocal.weight"),
    # an adapter trained on wav2vec-large features
    ("vocal_projector.proj_model.proj.weight", [1536, 1024], "size mismatch for vocal_projector.proj_model.proj"),
])
def test_real_shape_mismatch_is_named(key, shape, named):
    sd = manifest("transformer_module")
    sd[key] = torch.empty(shape, device="meta")
    with pytest.raises(RuntimeError) as err:
        load_transformer(sd)
    assert named in str(err.value)


def test_real_missing_key_is_named():
    sd = manifest("text_encoder_module")
    del sd["blocks.23.ffn.gate.0.weight"]
    with pytest.raises(CheckpointKeyError, match=r"blocks\.23\.ffn\.gate\.0\.weight"):
        load_text_encoder(sd)
