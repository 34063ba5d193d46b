"""``models_t5_umt5-xxl-enc-bf16.pth`` (Wan's own T5 module names) -> ``transformers.UMT5EncoderModel``.

One explicit table per layer (golden-feasibility §3). The original file has one token embedding; the HF model
holds it twice (``shared`` and the tied ``encoder.embed_tokens``), so both get the same tensor.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import UMT5EncoderModel

from pipeline.keymaps import check_original_keys
from pipeline.keymaps.files import load_checked

COMPONENT = "text_encoder"
EMBEDDING = "token_embedding.weight"
EMBEDDING_TARGETS = ("shared.weight", "encoder.embed_tokens.weight")


def text_encoder_key_map(num_layers: int) -> dict[str, str]:
    """Original name -> UMT5EncoderModel name, except the token embedding (which has two targets)."""
    table = {"norm.weight": "encoder.final_layer_norm.weight"}
    for i in range(num_layers):
        src, dst = f"blocks.{i}", f"encoder.block.{i}.layer"
        for p in ("q", "k", "v", "o"):
            table[f"{src}.attn.{p}.weight"] = f"{dst}.0.SelfAttention.{p}.weight"
        table[f"{src}.pos_embedding.embedding.weight"] = f"{dst}.0.SelfAttention.relative_attention_bias.weight"
        table[f"{src}.norm1.weight"] = f"{dst}.0.layer_norm.weight"
        table[f"{src}.norm2.weight"] = f"{dst}.1.layer_norm.weight"
        table[f"{src}.ffn.gate.0.weight"] = f"{dst}.1.DenseReluDense.wi_0.weight"
        table[f"{src}.ffn.fc1.weight"] = f"{dst}.1.DenseReluDense.wi_1.weight"
        table[f"{src}.ffn.fc2.weight"] = f"{dst}.1.DenseReluDense.wo.weight"
    return table


def convert_text_encoder_state_dict(sd: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Check the original names strictly, then rename (the embedding goes to both tied names)."""
    table = text_encoder_key_map(num_layers)
    check_original_keys(COMPONENT, sd, [EMBEDDING, *table])
    out = {dst: sd[src] for src, dst in table.items()}
    for dst in EMBEDDING_TARGETS:
        out[dst] = sd[EMBEDDING]
    return out


def load_text_encoder_weights(
    model: UMT5EncoderModel, sd: Mapping[str, torch.Tensor], *, assign: bool = False
) -> None:
    """Strictly load an original-layout T5 encoder checkpoint into ``model``."""
    converted = convert_text_encoder_state_dict(sd, model.config.num_layers)
    load_checked(COMPONENT, model, converted, assign=assign)
    if assign:  # assign replaced both Parameters: re-tie so the embedding exists once in memory
        model.encoder.embed_tokens.weight = model.shared.weight
