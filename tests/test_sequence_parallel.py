"""Sequence parallelism inside a unit: 2 and 3 gloo ranks compute what one device computes (fp32, CPU, max |d| <=
1e-5) for every kind of unit, the audio stays on its frames (upstream's split would differ), and the bytes each
rank sends are the ones ``step_volume`` predicts."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pipeline.denoise import WindowDenoiser, WindowStep
from pipeline.presets import REAL_TRANSFORMER, TINY_TRANSFORMER
from pipeline.sequence_parallel import (
    FrameSplit,
    SequenceParallelRank,
    choose_attention,
    step_volume,
    ulysses_degrees,
)
from pipeline.sequence_parallel.local import RankFailedError, run_local_ranks
from testing.sp_scenarios import (
    CONFIGS,
    HEIGHT,
    WIDTH,
    conditioning,
    equality_ranks,
    live_model,
    window_latents,
)

TOLERANCE = 1e-5  # fp32 on the CPU, on the latents (docs/many-gpus.md)
UNIT_KINDS = ["dit", "unit", "unit_short", "unit_row1", "cache_compute", "cache_reuse", "cache_rebuild"]
RUNS = {  # name: (degree, config, attention)
    "2-ulysses": (2, "tiny", "auto"),
    "2-ring": (2, "tiny", "ring"),
    "3-ring": (3, "tiny", "auto"),
    "3-ulysses": (3, "tiny-12-heads", "auto"),
}


@pytest.fixture(scope="module")
def runs() -> dict[str, list[dict]]:
    return {name: run_local_ranks(equality_ranks, degree, (config, attention, name == "3-ring"), timeout_s=240)
            for name, (degree, config, attention) in RUNS.items()}


# -- the split plan -----------------------------------------------------------------------------------------------
def test_frames_split_on_frame_boundaries_with_parallel_padding_at_the_end():
    three = FrameSplit(3)
    assert [list(three.frames(r)) for r in range(3)] == [list(range(0, 7)), list(range(7, 14)), list(range(14, 21))]
    assert three.padded_frames == 21
    two = FrameSplit(2)
    assert (two.frames_per_rank, two.padded_frames) == (11, 22)
    assert list(two.slots(1)) == list(range(11, 21))  # frame 21 is parallel padding: no audio slot
    assert two.valid_tokens(1, 1560) == 10 * 1560
    twelve = FrameSplit(12)
    assert (twelve.frames_per_rank, twelve.padded_frames) == (2, 24)
    assert [len(twelve.slots(r)) for r in range(12)] == [2] * 10 + [1, 0]


def test_attention_scheme_follows_the_head_count():
    assert ulysses_degrees(REAL_TRANSFORMER["num_attention_heads"]) == [2, 3, 4, 6, 12]
    assert ulysses_degrees(TINY_TRANSFORMER["num_attention_heads"]) == [2]  # the tiny preset has 2 heads
    assert ulysses_degrees(CONFIGS["tiny-12-heads"]["num_attention_heads"]) == [2, 3, 4, 6, 12]
    assert [choose_attention(12, d) for d in (2, 3, 4, 5, 6, 7, 8, 12, 21)] == [
        "ulysses", "ulysses", "ulysses", "ring", "ulysses", "ring", "ring", "ulysses", "ring"]
    with pytest.raises(ValueError, match=r"one of \[2, 3, 4, 6, 12\], got 5"):
        choose_attention(12, 5, "ulysses")
    with pytest.raises(ValueError, match="between 2 and 21"):
        choose_attention(12, 22)


# -- equality with one device -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RUNS)
def test_every_unit_kind_equals_one_device(runs, name):
    rank0 = runs[name][0]
    degree, config, attention = RUNS[name]
    expected_attention = attention if attention != "auto" else choose_attention(
        CONFIGS[config]["num_attention_heads"], degree)
    assert rank0["attention"] == expected_attention
    for kind in UNIT_KINDS:
        parallel, reference = rank0["parallel"][kind], rank0["reference"][kind]
        assert parallel.shape == reference.shape, kind
        assert reference.abs().max() > 1.0, kind  # a real output, not an empty or zero one
        assert (parallel - reference).abs().max() <= TOLERANCE, kind


def test_the_upstream_split_would_put_audio_on_the_wrong_frames(runs):
    """Each rank viewing its local tokens as the 21 frame slots (upstream's multi-GPU audio attention) changes the
    DiT output far beyond the tolerance, so the equality test above can fail."""
    rank0 = runs["3-ring"][0]
    reference = rank0["reference"]["dit"]
    assert (rank0["parallel"]["dit"] - reference).abs().max() <= TOLERANCE
    assert (rank0["upstream_split_dit"] - reference).abs().max() > 0.05


def test_step_cache_lookups_are_agreed_so_one_cold_rank_makes_all_rebuild(runs):
    # the last rank dropped its residual before the rebuild unit: every rank rebuilt (one reuse, one rebuild),
    # where one device reused twice, and the outputs still agree (test above)
    for name, ranks in runs.items():
        assert [r["parallel"]["stats"].tolist() for r in ranks] == [[1, 1]] * len(ranks), name
        assert ranks[0]["reference"]["stats"].tolist() == [2, 0]
        # then without anchor latents: every rank raises ResidualMissingError (none waits in a collective)
        assert [bool(r["parallel"]["missing_raised"]) for r in ranks] == [True] * len(ranks), name
        assert not ranks[0]["reference"]["missing_raised"]


def test_sp_degree_1_is_the_plain_model_through_window_denoiser():
    model = live_model("tiny")
    rank = SequenceParallelRank(model)
    assert rank.degree == 1 and rank.denoiser.transformer is model
    cond, (full, _, _) = conditioning(), window_latents()
    plain = WindowDenoiser(live_model("tiny"))
    assert torch.equal(rank.run(cond, WindowStep(0, 1, full)), plain(cond, WindowStep(0, 1, full)))


# -- communication volume -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RUNS)
def test_bytes_sent_per_unit_are_the_formula_at_tiny_size(runs, name):
    degree, config, attention = RUNS[name]
    volume = step_volume(CONFIGS[config], WIDTH, HEIGHT, degree, attention, batch=3, dtype_bytes=4)
    for rank in runs[name]:
        assert rank["sent"] == volume.sent_per_rank


def test_volume_at_480x832_in_bf16():
    # degree 3, Ulysses: 7 frames x 1560 tokens per rank; [3, 10920, 1536] bf16 = 100 638 720 bytes
    three = step_volume(REAL_TRANSFORMER, 480, 832, 3)
    assert (three.attention, three.local_tokens) == ("ulysses", 10920)
    assert three.bytes_per_call == {"ulysses_qkv": 201_277_440, "ulysses_out": 67_092_480, "output": 8_386_560}
    assert three.rank_bytes == 30 * (201_277_440 + 67_092_480) + 8_386_560
    # Ulysses and ring move the same bytes at degree 2; ring moves more from degree 3 on
    assert step_volume(REAL_TRANSFORMER, 480, 832, 2).block_rank_bytes == \
        step_volume(REAL_TRANSFORMER, 480, 832, 2, "ring").block_rank_bytes
    for degree in (3, 4, 6, 12):
        assert step_volume(REAL_TRANSFORMER, 480, 832, degree, "ring").rank_bytes > \
            step_volume(REAL_TRANSFORMER, 480, 832, degree).rank_bytes


# -- the launcher ---------------------------------------------------------------------------------------------------
def fail_on_rank_1(group: dist.ProcessGroup, device: torch.device) -> int:
    if dist.get_rank(group) == 1:
        raise RuntimeError("rank 1 broke")
    return dist.get_rank(group)


def test_a_failing_rank_surfaces_with_its_traceback():
    with pytest.raises(RankFailedError, match="rank 1 broke"):
        run_local_ranks(fail_on_rank_1, 2, timeout_s=60)


def test_bytes_counted_at_tiny_size_scale_to_the_480x832_figures(runs):
    """The 12-head tiny run scaled by its size ratios (tokens per frame, width, blocks, bytes per value) gives the
    real model's table: the traffic is linear in each, as the formula says."""
    tiny, real = CONFIGS["tiny-12-heads"], REAL_TRANSFORMER
    real_volume = step_volume(real, 480, 832, 3)
    tokens = real_volume.tokens_per_frame // step_volume(tiny, WIDTH, HEIGHT, 3).tokens_per_frame  # 1560 / 15
    per_value = (real["num_attention_heads"] * real["attention_head_dim"]) // (
        tiny["num_attention_heads"] * tiny["attention_head_dim"])  # 1536 / 96
    blocks = real["num_layers"] // tiny["num_layers"]
    counted = runs["3-ulysses"][0]["sent"]
    scaled = {op: n * tokens * (1 if op == "output" else per_value * blocks) // 2 for op, n in counted.items()}
    assert scaled == real_volume.sent_per_rank  # fp32 -> bf16: // 2
