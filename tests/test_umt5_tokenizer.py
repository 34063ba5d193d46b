"""The ``google/umt5-xxl`` tokenizer folder as Wan ships it, loaded through ``pipeline.text.HFTokenizer``.

The real folder (``Wan2.1-Fun-V1.1-1.3B-InP/google/umt5-xxl/``) holds ``spiece.model``, ``tokenizer.json``,
``tokenizer_config.json`` (``tokenizer_class: T5Tokenizer``, ``extra_ids: 300``, ``added_tokens_decoder`` with
``<pad>`` 0, ``</s>`` 1, ``<s>`` 2, ``<unk>`` 3 and the ``<extra_id_N>`` sentinels after the SentencePiece vocabulary,
in reverse) and ``special_tokens_map.json``. This test trains a small SentencePiece Unigram model with the same
special ids and byte fallback, and writes the four files the way they are laid out there. Upstream tokenised with
transformers 4.x ``T5TokenizerFast``, i.e. with ``tokenizer.json`` as written, so that file's own tokenizer is the
oracle; with byte fallback in the file it also equals SentencePiece's own ids plus ``</s>``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

from pipeline.settings import NEGATIVE_PROMPT
from pipeline.text import TEXT_LENGTH, HFTokenizer, clean_prompt

SPECIALS = ["<pad>", "</s>", "<s>", "<unk>"]  # ids 0..3, as umt5
EXTRA_IDS = 8  # umt5 ships 300 sentinels; 8 keep the files small with the same layout
CORPUS = [
    "a person is talking to the camera with a calm voice",
    "a woman speaks in a bright room and smiles",
    "the man is singing a song on a stage",
    NEGATIVE_PROMPT,
    "Une femme parle devant la caméra",
    "日本語の文章も少しあります",
]
PROMPTS = [
    "a person is talking",
    NEGATIVE_PROMPT,
    "A woman, smiling; talks 🦙 about Ωmega and zebras",  # characters absent from the training corpus
    "  leading and   repeated   spaces\tand tabs  ",
    "<extra_id_0> is a sentinel",
]


def build_umt5_folder(folder: Path, byte_fallback: bool) -> Path:
    """Train the SentencePiece model and write spiece.model, tokenizer.json, tokenizer_config.json and
    special_tokens_map.json as in the Wan folder (tokenizer.json as transformers' T5 converter writes it)."""
    folder.mkdir(parents=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, model_type="unigram", vocab_size=400,
        hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True, minloglevel=2,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="</s>", bos_piece="<s>",
        unk_piece="<unk>",
    )
    (folder / "spiece.model").write_bytes(model.getvalue())
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    pieces = len(proto.pieces)
    sentinels = [f"<extra_id_{i}>" for i in range(EXTRA_IDS - 1, -1, -1)]  # ids pieces.. in reverse, as T5

    vocab = [(p.piece, p.score) for p in proto.pieces] + [(s, 0.0) for s in sentinels]
    tok = Tokenizer(Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=byte_fallback))
    tok.normalizer = normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS + sentinels])
    tok.save(str(folder / "tokenizer.json"))

    def added(content: str) -> dict:
        return dict(content=content, lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)

    decoder = {str(i): added(t) for i, t in enumerate(SPECIALS)}
    decoder |= {str(pieces + j): added(t) for j, t in enumerate(sentinels)}
    in_order = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    names = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        added_tokens_decoder=decoder, additional_special_tokens=in_order, clean_up_tokenization_spaces=True,
        extra_ids=EXTRA_IDS, model_max_length=int(1e30), sp_model_kwargs={},
        spaces_between_special_tokens=False, tokenizer_class="T5Tokenizer", **names), indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps(dict(additional_special_tokens=in_order, **names), indent=2))
    return folder


@pytest.fixture(scope="module", params=[True, False], ids=["byte-fallback", "no-byte-fallback"])
def folder(request, tmp_path_factory) -> Path:
    return build_umt5_folder(tmp_path_factory.mktemp("wan") / "google" / "umt5-xxl", byte_fallback=request.param)


@pytest.fixture(scope="module")
def tokenizer(folder) -> HFTokenizer:
    return HFTokenizer(folder)


def file_ids(folder: Path, text: str) -> list[int]:
    """What upstream computed: the folder's tokenizer.json as written (transformers 4.x T5TokenizerFast)."""
    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(clean_prompt(text)).ids


def test_folder_has_the_shipped_layout(folder):
    assert sorted(p.name for p in folder.iterdir()) == [
        "special_tokens_map.json", "spiece.model", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "T5Tokenizer"
    assert [config["added_tokens_decoder"][str(i)]["content"] for i in range(4)] == SPECIALS


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_ids_mask_and_padding_match_the_shipped_tokenizer(folder, tokenizer, prompt):
    ids, mask = tokenizer([prompt])
    want = file_ids(folder, prompt)
    n = len(want)
    assert ids.shape == mask.shape == (1, TEXT_LENGTH) and ids.dtype == torch.long
    assert ids[0, :n].tolist() == want
    assert ids[0, n - 1] == 1  # </s> closes every prompt
    assert mask[0, :n].tolist() == [1] * n and int(mask.sum()) == n  # the encoder cuts rows to this length
    assert ids[0, n:].eq(0).all() and mask[0, n:].eq(0).all()  # <pad> = 0 after it


def test_unknown_characters_never_become_bos(folder, tokenizer):
    """transformers 5's ``T5Tokenizer`` rebuild maps them to id 2 (``<s>``); umt5's ``<unk>`` is 3."""
    ids, mask = tokenizer(["🦙 Ωmega"])
    real = ids[0, : int(mask.sum())].tolist()
    assert 2 not in real
    assert real == file_ids(folder, "🦙 Ωmega")


def test_byte_fallback_matches_sentencepiece(tmp_path):
    """With byte fallback (as SentencePiece itself), ids are SentencePiece's plus </s>: the folder is faithful."""
    folder = build_umt5_folder(tmp_path / "umt5-xxl", byte_fallback=True)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    tokenizer = HFTokenizer(folder)
    for prompt in PROMPTS[:4]:  # SentencePiece itself knows no sentinels
        ids, mask = tokenizer([prompt])
        assert ids[0, : int(mask.sum())].tolist() == sp.encode(clean_prompt(prompt)) + [1], prompt


def test_long_prompt_is_truncated_to_512_ending_with_eos(folder, tokenizer):
    prompt = " ".join([CORPUS[0]] * 80)
    want = file_ids(folder, prompt)
    assert len(want) > TEXT_LENGTH
    ids, mask = tokenizer([prompt, "a person is talking"])
    assert ids.shape == (2, TEXT_LENGTH) and mask[0].all()
    assert ids[0, : TEXT_LENGTH - 1].tolist() == want[: TEXT_LENGTH - 1] and ids[0, -1] == 1
    assert ids[1, : int(mask[1].sum())].tolist() == file_ids(folder, "a person is talking")  # batch rows independent


def test_folder_without_tokenizer_json_is_named(folder, tmp_path):
    partial = tmp_path / "umt5-xxl"
    partial.mkdir()
    for name in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json"):
        (partial / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HFTokenizer(partial)


def test_tokenizer_with_other_special_ids_is_refused(folder, tmp_path):
    """A tokenizer whose pad is not 0 would give the T5 encoder a wrong mask: refused at load."""
    other = tmp_path / "other"
    other.mkdir()
    for name in ("spiece.model", "tokenizer.json", "special_tokens_map.json"):
        (other / name).write_bytes((folder / name).read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["pad_token"] = "<unk>"
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="expected pad 0 and eos 1"):
        HFTokenizer(other)
