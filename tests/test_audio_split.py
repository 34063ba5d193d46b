"""The wav2vec-token -> latent-frame-slot assignment, index-exact against golden/audio_split/cases.json."""

from __future__ import annotations

import pytest
import torch

from pipeline.models.audio_split import latent_slot_count, split_audio_sequence, split_tensor_with_padding

CASE_NS = [161, 167, 100, 57, 122]


@pytest.fixture(scope="module")
def cases(golden) -> dict[int, dict]:
    data = golden("audio_split").json("cases")
    return {case["N"]: case for case in data["cases"]}


def test_all_cases_present(cases):
    assert sorted(cases) == sorted(CASE_NS)


@pytest.mark.parametrize("n_tokens", CASE_NS)
def test_ranges(cases, n_tokens):
    case = cases[n_tokens]
    ranges = split_audio_sequence(n_tokens, num_frames=case["num_frames"])
    assert len(ranges) == case["num_latent_slots"] == latent_slot_count(case["num_frames"]) == 21
    assert [list(r) for r in ranges] == case["pos_idx_ranges"]


@pytest.mark.parametrize("n_tokens", CASE_NS)
def test_split_with_padding(cases, n_tokens):
    case = cases[n_tokens]
    ranges = split_audio_sequence(n_tokens, num_frames=case["num_frames"])
    # Channel 0 encodes the token index + 1 (so 0 marks padding); channel 1 checks the channels travel together.
    x = torch.zeros(2, n_tokens, 2)
    x[:, :, 0] = torch.arange(1, n_tokens + 1)
    x[:, :, 1] = -torch.arange(1, n_tokens + 1)
    x[1] *= 10

    slots, k_lens = split_tensor_with_padding(x, ranges, expand_length=case["expand_length"])

    assert slots.shape == (2, 21, case["K"], 2)
    assert k_lens.dtype == torch.long
    assert k_lens.tolist() == case["k_lens"]
    assert (slots[0, :, :, 0].long() - 1).tolist() == case["per_frame_token_indices"]
    torch.testing.assert_close(slots[:, :, :, 1], -slots[:, :, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(slots[1], 10 * slots[0], rtol=0, atol=0)
    # Valid tokens first, then zeros: slot j is non-zero exactly for its first k_lens[j] positions.
    valid = torch.arange(case["K"])[None, :] < k_lens[:, None]
    assert torch.equal(slots[0, :, :, 0] != 0, valid)
