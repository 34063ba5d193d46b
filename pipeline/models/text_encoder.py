"""UMT5-XXL encoder (``transformers.UMT5EncoderModel``) as Wan uses it: 512 padded tokens, cut to real length."""

from __future__ import annotations

from typing import Any

import torch
from transformers import UMT5Config, UMT5EncoderModel

from .devices import compute_device


def build_text_encoder(**config: Any) -> UMT5EncoderModel:
    """``UMT5EncoderModel(UMT5Config(**config))`` in eval mode without gradients."""
    model = UMT5EncoderModel(UMT5Config(**config))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def encode_prompts(
    model: UMT5EncoderModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> list[torch.Tensor]:
    """Token ids/mask [B,512] -> one [n_i, d] tensor per row, cut to the row's real token count.

    All rows go through one batch call (identical to per-row calls: masked keys get the dtype minimum). The cut
    matches upstream, which hands the DiT a list of unpadded contexts that it zero-pads back to 512 itself.
    """
    device = compute_device(model)
    hidden = model(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
    ).last_hidden_state  # [B,512,d]
    lengths = attention_mask.sum(dim=1).tolist()  # real tokens per row
    return [hidden[i, : int(n)] for i, n in enumerate(lengths)]
