"""``bench/bench_gpu.py`` at tiny size on the CPU (``--quick``), in a subprocess: every phase runs and its JSON fields
are present and consistent, so the GPU benchmark is ready to run when a device is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.bench_gpu import PHASES, dit_flops
from pipeline.models.audio_split import AUDIO_EXPAND_LENGTH, split_audio_sequence
from pipeline.presets import REAL_TRANSFORMER, TINY_TRANSFORMER
from testing.media import REPO_ROOT

pytestmark = pytest.mark.long  # the whole benchmark at tiny size: the longest test without Ray


def test_flop_count_matches_the_reference_estimate():
    """peers-and-compute-floor.md §3.2: 284.8 TFLOP per row at 480x832 without audio; the adapter ~0.6 TFLOP."""
    slot_len = max(e - s + 1 for s, e in split_audio_sequence(161)) + 2 * AUDIO_EXPAND_LENGTH
    row = dit_flops(REAL_TRANSFORMER, 32760, 1, 161, slot_len, with_adapter=False)
    assert 284.0e12 < row < 286.0e12
    adapter = dit_flops(REAL_TRANSFORMER, 32760, 1, 161, slot_len, with_adapter=True) - row
    assert 0.5e12 < adapter < 0.8e12
    assert dit_flops(REAL_TRANSFORMER, 32760, 3, 161, slot_len, True) == 3 * row + adapter


def test_quick_cpu_run_writes_every_phase(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "bench_gpu.py"), "--preset", "tiny", "--device", "cpu",
         "--quick", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["errors"] == {}
    assert set(PHASES) <= set(result)
    assert result["meta"]["preset"] == "tiny" and result["meta"]["finished"]

    pre = result["preprocess"]
    assert (pre["width"], pre["height"], pre["windows"], pre["seq_len"]) == (48, 80, 2, 21 * 5 * 3)
    assert all(pre[k] > 0 for k in ("wav2vec_all_windows_s", "t5_prompt_s", "clip_s", "vae_encode_s"))

    for mode in (result["forward"], result["compile"]["forward"]):
        batch3 = mode["batch3"]
        assert batch3["latency_s_min"] > 0 and batch3["achieved_tflops"] > 0
        assert batch3["flop"] == dit_flops(TINY_TRANSFORMER, 315, 3, 161, 15, with_adapter=True)
    assert result["forward"]["batch1"]["flop"] < result["forward"]["batch3"]["flop"]

    assert any("scaled_dot_product" in op for op in result["sdpa"]["attention_ops"])
    assert result["sdpa"]["diffusers_backend"] == "native"
    assert result["vae_decode"]["frames"] == 125 and result["vae_decode"]["frames_per_s"] > 0

    for clip in (result["e2e"], result["compile"]["e2e"]):
        assert (clip["frames"], clip["windows"], clip["steps"]) == (125, 2, 2) and clip["file_size"] > 0
    assert result["compile"]["how"] == "repeated_blocks"

    runs = {(r["level"], r["guard_fitted_range"]): r for r in result["acceleration"]["runs"]}
    assert runs[("none", None)]["row_forwards_skipped"] == 0 and runs[("none", None)]["max_abs_diff_vs_none"] == 0
    assert runs[("high", True)]["plan"] == "C" * 8  # tiny's e0 moves beyond the fitted range: guarded, no skip
    assert runs[("high", False)]["plan"] == "CCCCC..C" and runs[("high", False)]["row_forwards_skipped"] == 2 * 2 * 3
    assert runs[("high", False)]["max_abs_diff_vs_none"] > 0

    split = result["split_rows"]
    assert max(split["noise_prediction_max_abs_diff_per_row"]) < 1e-5  # fp32 on the CPU: batch 1 vs 3 rounding
    assert 0 < split["final_latents_fraction_differing"] < 0.05
    assert result["load"]["peak_host_rss_gb"] > 0
    assert result["card"]["bf16_peak_tflops"] is None  # the CPU has no entry in the peak table
    modes = result["memory_modes"]["modes"]
    assert all(clip["latents_max_abs_diff_vs_reference"] == 0 for mode, clip in modes.items() if "fp8" not in mode)
    assert all(clip["latents_max_abs_diff_vs_reference"] > 0 for mode, clip in modes.items() if "fp8" in mode)
    assert result["e2e"]["extrapolated"]["steps"] == 50 and result["skipped"] == {}


def test_the_card_table_matches_the_most_specific_name():
    from bench.bench_gpu import bf16_peak_tflops as peak

    assert peak("NVIDIA H100 80GB HBM3") == 989.4 and peak("NVIDIA H100 PCIe") == 756.0
    assert peak("NVIDIA H200") == 989.4 and peak("NVIDIA H200 NVL") == 835.0
    assert peak("NVIDIA GeForce RTX 4090") == 165.2 and peak("Some Future GPU") is None
