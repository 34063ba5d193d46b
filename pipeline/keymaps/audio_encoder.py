"""Hugging Face wav2vec 2.0 checkpoints -> our ``transformers.Wav2Vec2Model``.

Published folders such as ``wav2vec2-base-960h`` hold a ``Wav2Vec2ForCTC``: every encoder key is prefixed with
``wav2vec2.`` and a CTC head ``lm_head.*`` sits beside it; older files spell the weight-normed positional conv
``weight_g``/``weight_v`` where current torch writes ``parametrizations.weight.original0/1``. Those three
differences are translated explicitly; anything else that does not match is refused.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import Wav2Vec2Model

from pipeline.keymaps import CheckpointKeyError
from pipeline.keymaps.files import load_checked

COMPONENT = "audio_encoder"
BASE_PREFIX = "wav2vec2."
HEAD_PREFIXES = ("lm_head.",)  # CTC head of Wav2Vec2ForCTC: not used, features are last_hidden_state
MASK_EMBED = "masked_spec_embed"  # SpecAugment vector; exists only when the config enables masking
WEIGHT_NORM_RENAMES = {
    "encoder.pos_conv_embed.conv.weight_g": "encoder.pos_conv_embed.conv.parametrizations.weight.original0",
    "encoder.pos_conv_embed.conv.weight_v": "encoder.pos_conv_embed.conv.parametrizations.weight.original1",
}


def convert_audio_encoder_state_dict(
    sd: Mapping[str, torch.Tensor], model_keys: set[str]
) -> dict[str, torch.Tensor]:
    """Rename a checkpoint onto ``model_keys``; errors name unexpected keys as the file spells them."""
    renamed: dict[str, str] = {}  # model name -> original name
    for key in sd:
        if key.startswith(HEAD_PREFIXES):
            continue
        name = key.removeprefix(BASE_PREFIX)
        name = WEIGHT_NORM_RENAMES.get(name, name)
        if name == MASK_EMBED and MASK_EMBED not in model_keys:
            continue
        if name in renamed:
            raise CheckpointKeyError(COMPONENT, [], [key, renamed[name]])  # e.g. both weight_g and original0
        renamed[name] = key
    missing = model_keys - set(renamed)
    unexpected = {orig for name, orig in renamed.items() if name not in model_keys}
    if missing or unexpected:
        raise CheckpointKeyError(COMPONENT, missing, unexpected)
    return {name: sd[orig] for name, orig in renamed.items()}


def load_audio_encoder_weights(model: Wav2Vec2Model, sd: Mapping[str, torch.Tensor], *, assign: bool = False) -> None:
    """Strictly load an HF wav2vec2 (base model or ForCTC) checkpoint into ``model``."""
    converted = convert_audio_encoder_state_dict(sd, set(model.state_dict()))
    load_checked(COMPONENT, model, converted, assign=assign)
