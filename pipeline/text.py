"""Prompt tokenisation and T5 encoding, with the fixed negative prompt encoded once per process and other prompts
cached by text (:class:`~pipeline.prompt_cache.PromptEmbeddingCache`).

The real preset uses the umt5-xxl tokenizer shipped in the checkpoint folder. Presets with random weights use a
byte-level tokenizer (no files to download): their text embeddings are meaningless anyway, but the shapes, the
512-token padding and the masking are the same as the real path.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from pipeline.prompt_cache import PromptEmbeddingCache
from pipeline.settings import NEGATIVE_PROMPT

TEXT_LENGTH = 512  # T5 tokens; the DiT hard-codes a 512-row text context


Tokenizer = Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]


def clean_prompt(text: str) -> str:
    """Collapse whitespace, as Wan's prompt cleaner does."""
    return re.sub(r"\s+", " ", text).strip()


class ByteTokenizer:
    """UTF-8 bytes as token ids (2..257 folded into the vocabulary), EOS = 1, pad = 0, padded to 512."""

    def __init__(self, vocab_size: int, max_length: int = TEXT_LENGTH):
        self.vocab_size, self.max_length = vocab_size, max_length

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            tokens = [2 + b % (self.vocab_size - 2) for b in clean_prompt(prompt).encode()][: self.max_length - 1]
            tokens.append(1)
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return ids, mask


class HFTokenizer:
    """The umt5-xxl tokenizer from the checkpoint folder (offline), padded to 512 with truncation.

    The folder's ``tokenizer.json`` is used verbatim, as upstream's transformers 4.x ``T5TokenizerFast`` used it.
    transformers 5's ``T5Tokenizer`` (which ``AutoTokenizer`` picks from the folder's ``tokenizer_config.json``)
    rebuilds the Unigram model from the vocabulary with ``unk_id=2`` and byte fallback off; umt5 has ``<unk>`` at 3
    and ``<s>`` at 2, so every out-of-vocabulary character would silently become ``<s>`` instead of its byte
    pieces or ``<unk>``. The special ids the T5 encoder relies on are checked at load.
    """

    FILE = "tokenizer.json"
    PAD_ID, EOS_ID = 0, 1  # umt5: <pad> = 0 (attention mask 0), </s> = 1 appended to every prompt

    def __init__(self, folder: Path, max_length: int = TEXT_LENGTH):
        from transformers import PreTrainedTokenizerFast

        folder = Path(folder)
        if not (folder / self.FILE).is_file():
            raise FileNotFoundError(f"tokenizer folder {folder} lacks {self.FILE} (of the google/umt5-xxl files)")
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
        self.max_length = max_length
        ids = {"pad": self.tokenizer.pad_token_id, "eos": self.tokenizer.eos_token_id}
        if ids != {"pad": self.PAD_ID, "eos": self.EOS_ID}:
            raise ValueError(f"tokenizer in {folder} is not umt5's: special ids {ids}, expected pad 0 and eos 1")

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.tokenizer(
            [clean_prompt(p) for p in prompts], padding="max_length", max_length=self.max_length,
            truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        return out.input_ids, out.attention_mask


class PromptEncoder:
    """Encodes prompts to unpadded T5 rows ``[n_tokens, d]``: the negative prompt once per process, the others
    through ``cache`` (keyed by the cleaned text the tokenizer sees; ``None``: every prompt runs T5)."""

    def __init__(self, tokenizer: Tokenizer, text_encoder: torch.nn.Module, negative_prompt: str = NEGATIVE_PROMPT,
                 cache: PromptEmbeddingCache | None = None):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.negative_prompt = negative_prompt
        self.cache = cache
        self._negative: torch.Tensor | None = None

    @torch.no_grad()
    def run_text_encoder(self, prompt: str) -> torch.Tensor:
        """One T5 forward, never cached (on the text encoder's device)."""
        from pipeline.models.text_encoder import encode_prompts

        ids, mask = self.tokenizer([prompt])
        return encode_prompts(self.text_encoder, ids, mask)[0]

    def encode(self, prompt: str) -> torch.Tensor:
        """The prompt's embedding, from the cache when it holds it (in host memory when cached)."""
        if self.cache is None:
            return self.run_text_encoder(prompt)
        key = clean_prompt(prompt)
        embedding = self.cache.get(key)
        if embedding is None:
            embedding = self.cache.put(key, self.run_text_encoder(prompt))
        return embedding

    def negative(self) -> torch.Tensor:
        if self._negative is None:
            self._negative = self.run_text_encoder(self.negative_prompt)
        return self._negative
