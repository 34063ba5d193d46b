"""Model presets: a full model definition (component configs), a resolution table and where weights come from.

* ``tiny``: the real architecture shrunk to the golden-vector sizes, random weights from a fixed seed; fast on 2 CPU
  cores. Tests, CI and the demo use it. Its videos are noise.
* ``stableavatar-1.3b``: the real model, weights from the official checkpoint layout (``--checkpoints DIR``).
* ``stableavatar-1.3b-random``: real sizes, random weights: GPU timing without a download.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

WeightSource = Literal["random", "checkpoint"]
TokenizerKind = Literal["bytes", "umt5"]
TransformerVariant = Literal["square", "rec-vec"]

# (width, height) per aspect ratio, as trained: rec 832x480, vec 480x832, square 512x512.
REAL_RESOLUTIONS: dict[str, tuple[int, int]] = {"16:9": (832, 480), "9:16": (480, 832), "1:1": (512, 512)}
# Tiny sizes keep the same three shapes (multiples of 16: VAE x8, patch x2).
TINY_RESOLUTIONS: dict[str, tuple[int, int]] = {"16:9": (80, 48), "9:16": (48, 80), "1:1": (64, 64)}

REAL_TRANSFORMER: dict[str, Any] = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=36, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280, added_kv_proj_dim=1536, rope_max_seq_len=1024,
    audio_in_dim=768, audio_heads=8,
)
TINY_TRANSFORMER: dict[str, Any] = dict(
    REAL_TRANSFORMER, num_attention_heads=2, attention_head_dim=32, text_dim=32, ffn_dim=128, num_layers=2,
    image_dim=32, added_kv_proj_dim=64, audio_in_dim=32,
)

REAL_VAE: dict[str, Any] = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True],
)
TINY_VAE: dict[str, Any] = dict(REAL_VAE, base_dim=4)

REAL_TEXT_ENCODER: dict[str, Any] = dict(
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    dropout_rate=0.0, layer_norm_epsilon=1e-6,
)
TINY_TEXT_ENCODER: dict[str, Any] = dict(REAL_TEXT_ENCODER, vocab_size=256, d_model=32, d_kv=8, d_ff=64,
                                         num_layers=2, num_heads=4)

REAL_IMAGE_ENCODER: dict[str, Any] = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
    patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5,
)
TINY_IMAGE_ENCODER: dict[str, Any] = dict(REAL_IMAGE_ENCODER, hidden_size=32, intermediate_size=128,
                                          num_hidden_layers=3, num_attention_heads=2)

REAL_AUDIO_ENCODER: dict[str, Any] = dict()  # Wav2Vec2Config() defaults are wav2vec2-base
TINY_AUDIO_ENCODER: dict[str, Any] = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    conv_dim=(16,) * 7, conv_bias=False, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
    feat_extract_norm="group", do_stable_layer_norm=False, vocab_size=32,
)
FEATURE_EXTRACTOR: dict[str, Any] = dict(
    feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=False,
)


@dataclass(frozen=True)
class ModelPreset:
    name: str
    description: str
    weights: WeightSource
    tokenizer: TokenizerKind
    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    image_encoder: dict[str, Any]
    audio_encoder: dict[str, Any]
    resolutions: dict[str, tuple[int, int]]
    feature_extractor: dict[str, Any] = field(default_factory=lambda: dict(FEATURE_EXTRACTOR))
    random_seed: int = 20250821
    # CPU float results depend on torch's thread count; the tiny preset pins it so that a Ray replica computes
    # exactly what the CLI computes. None leaves torch's default (GPU presets).
    torch_threads: int | None = None
    # When set, builds the DiT instead of StableAvatarTransformer3DModel (a stand-in registered by a benchmark, see
    # bench/simulated.py); its forward takes the same arguments. None for every shipped preset.
    transformer_factory: Callable[[], Any] | None = None
    # When set, builds the VAE instead of ``AutoencoderKLWan(**vae)`` (a benchmark stand-in with the same interface
    # and the same x8 spatial / x4 temporal factors, see bench/simulated.py). None for every shipped preset.
    vae_factory: Callable[[], Any] | None = None

    @property
    def is_random(self) -> bool:
        return self.weights == "random"


PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(
        name="tiny",
        description="real architecture, tiny sizes, random weights (tests and demo; output is noise)",
        weights="random", tokenizer="bytes",
        transformer=TINY_TRANSFORMER, vae=TINY_VAE, text_encoder=TINY_TEXT_ENCODER,
        image_encoder=TINY_IMAGE_ENCODER, audio_encoder=TINY_AUDIO_ENCODER, resolutions=TINY_RESOLUTIONS,
        torch_threads=1,
    ),
    "stableavatar-1.3b": ModelPreset(
        name="stableavatar-1.3b",
        description="StableAvatar 1.3B (Wan2.1-Fun-V1.1-1.3B-InP + audio adapter), official checkpoints",
        weights="checkpoint", tokenizer="umt5",
        transformer=REAL_TRANSFORMER, vae=REAL_VAE, text_encoder=REAL_TEXT_ENCODER,
        image_encoder=REAL_IMAGE_ENCODER, audio_encoder=REAL_AUDIO_ENCODER, resolutions=REAL_RESOLUTIONS,
    ),
    "stableavatar-1.3b-random": ModelPreset(
        name="stableavatar-1.3b-random",
        description="StableAvatar 1.3B sizes with random weights (GPU timing without downloads; output is noise)",
        weights="random", tokenizer="bytes",
        transformer=REAL_TRANSFORMER, vae=REAL_VAE, text_encoder=REAL_TEXT_ENCODER,
        image_encoder=REAL_IMAGE_ENCODER, audio_encoder=REAL_AUDIO_ENCODER, resolutions=REAL_RESOLUTIONS,
    ),
}


def register_preset(preset: ModelPreset) -> ModelPreset:
    """Add a preset under ``preset.name`` (benchmarks register stand-ins; the app args' ``preset_modules`` import
    the module that does it in every replica). Registering the same name again replaces it."""
    PRESETS[preset.name] = preset
    return preset


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
