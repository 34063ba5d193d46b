"""``bench/bench_sp.py`` at tiny size on the CPU: every section runs and writes consistent fields, so the multi-GPU
timing section (the same code over NCCL) is ready for a node with several GPUs."""

from __future__ import annotations

import json

from bench.bench_sp import main


def test_every_section_runs_at_tiny_size(tmp_path):
    out, txt = tmp_path / "sp.json", tmp_path / "sp.txt"
    code = main(["--sections", "equality,volume,timing", "--preset", "tiny", "--degrees", "1,2",
                 "--warmup", "0", "--repeats", "1", "--json", str(out), "--txt", str(txt)])
    assert code == 0
    result = json.loads(out.read_text())
    assert [(r["degree"], r["attention"]) for r in result["equality"]] == [(2, "ulysses"), (2, "ring")]
    assert all(r["within_tolerance"] and r["bytes_match_formula"] for r in result["equality"])
    assert [(r["degree"], r["attention"]) for r in result["volume"]] == [(2, "ulysses"), (2, "ring")]
    timing = {r["degree"]: r for r in result["timing"]}
    assert set(timing) == {1, 2} and timing[1]["speedup"] == 1.0
    assert timing[2]["attention"] == "ulysses" and timing[2]["max_abs_diff_vs_degree_1"] <= 1e-5
    assert timing[2]["bytes_sent_per_rank"]["ulysses_qkv"] > 0 and timing[1]["bytes_sent_per_rank"] == {}
    assert "equality with one device" in txt.read_text() and "timing: tiny" in txt.read_text()


def test_the_latency_estimate_follows_its_inputs_and_the_shipped_table_is_current(tmp_path):
    """``bench/sp_estimate.py``: a 3 s clip is one window and a 5 s clip two; one GPU's batch-3 unit is the forward
    time, a parallel unit's is its frames' share plus its bytes over the link, a measured unit time replaces the
    model; and ``bench/results/sp_estimate.json`` is what the script computes from ``sp.json`` at its defaults."""
    from bench.sp_estimate import ROOT, VOLUME, estimate, main, unit_seconds

    volume = json.loads(VOLUME.read_text())["volume"]
    rows = {(r["clip_s"], r["sp_degree"], r["split_guidance_rows"]): r
            for r in estimate(volume, forward_s=2.0, link_gbs=100.0, efficiency=1.0, gpus=8, steps=10)}
    assert rows[(3.0, 1, False)]["windows"] == 1 and rows[(5.0, 1, False)]["windows"] == 2
    assert rows[(3.0, 1, False)]["unit_s"] == 2.0 and rows[(3.0, 1, False)]["gpus_busy"] == 1
    assert rows[(5.0, 1, True)]["gpus_busy"] == 6 and rows[(5.0, 1, True)]["latency_s"] == round(10 * 2.0 / 3, 1)
    sent = next(r["step_bytes_per_rank"] for r in volume if (r["degree"], r["attention"]) == (3, "ulysses"))
    assert rows[(3.0, 3, False)]["unit_s"] == round(2.0 * 7 / 21 + sent / 100e9, 4)
    assert rows[(5.0, 3, False)]["replicas"] == 2 and rows[(5.0, 3, False)]["rounds_per_step"] == 1
    assert unit_seconds(3, 3, 2.0, sent, 100.0, 1.0, measured={3: 0.9}) == 0.9
    assert unit_seconds(3, 1, 2.0, sent, 100.0, 1.0, measured={3: 0.9}) == 0.3

    out, txt = tmp_path / "estimate.json", tmp_path / "estimate.txt"
    assert main(["--json", str(out), "--txt", str(txt)]) == 0
    shipped = json.loads((ROOT / "bench" / "results" / "sp_estimate.json").read_text())
    assert json.loads(out.read_text()) == shipped and shipped["meta"]["model"] is True
    assert txt.read_text().startswith("Model, not a measurement")
